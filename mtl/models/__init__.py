"""Plain ``nn.Module``s: encoders (by name), episodic batch norm, the shared-trunk multi-head model."""

from mtl.models.batchnorm import (
    EpisodicBatchNorm2d,
    SupportBatchNorm,
    calibrate_batchnorm,
    channel_stats,
    setting,
    step_statistics,
    support_statistics,
)
from mtl.models.encoders import ENCODERS, build_encoder
from mtl.models.encoders.conv import ConvEncoder, channels_last, channels_last_weight
from mtl.models.encoders.text import HeldState, TextEncoder
from mtl.models.heads import logistic_head
from mtl.models.multitask import ModelConfig, MultiTaskModel, head_key, mlp

__all__ = ["ENCODERS", "ConvEncoder", "EpisodicBatchNorm2d", "HeldState", "ModelConfig", "MultiTaskModel",
           "SupportBatchNorm", "TextEncoder", "build_encoder", "calibrate_batchnorm", "channel_stats",
           "channels_last", "channels_last_weight", "head_key", "logistic_head", "mlp", "setting",
           "step_statistics", "support_statistics"]

"""mtl: multi-task learning with a MAML initialization.

Data flows one way: YAML task file -> :class:`~mtl.data.Task` -> episodes -> model -> checkpoint.
"""

from mtl.errors import MtlError, TaskFileError

__version__ = "0.1.0"
__all__ = ["MtlError", "TaskFileError", "__version__"]

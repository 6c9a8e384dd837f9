"""Two CPU processes (gloo, localhost, torchrun) reach the parameters of one process with the same
seed and total meta-batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from mtl.run.checkpoint import load_checkpoint
from tests.conftest import needs_data, write

ROOT = Path(__file__).parents[1]
RECIPE = """\
method: {method}
tasks: [omniglot-latin, omniglot-greek]
ways: 5
shots: 1
queries: 3
meta_batch: 4
iterations: 3
val_every: 3
outer_lr: 0.003
inner: {{steps: 1, lr: 0.4}}
threads: 1
device: cpu
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in_one_process(base: list[str], out: Path) -> None:
    one = subprocess.run([sys.executable, *base, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr


def why(run: subprocess.CompletedProcess) -> str:
    """A failed launch's own words: a rank that aborts in C++ ("terminate called ...", "what(): ...") says so
    long before torchrun's summary, which alone would fill the last 2,000 characters."""
    said = [ln for ln in run.stderr.splitlines() if any(w in ln for w in ("terminate", "what()", "Error", "error:"))]
    return "\n".join(said[:20]) + "\n...\n" + run.stderr[-1500:]


def assert_same_parameters(one: Path, two: Path) -> None:
    """The two runs' last parameters agree (to summation order), and training moved them."""
    a, _ = load_checkpoint(one / "last.safetensors")
    b, _ = load_checkpoint(two / "last.safetensors")
    params = [k for k in a if k.startswith("learner.")]
    assert params and max(float((a[k] - b[k]).abs().max()) for k in params) < 1e-5
    moved = [k for k in params if k.endswith("blocks.0.weight")]
    assert moved and float(a[moved[0]].abs().sum()) > 0


@needs_data
def test_two_processes_equal_one_multitask(tmp_path):
    """Joint training; MAML's two-process run is checked, interrupted and resumed, below."""
    cfg = write(tmp_path / "r.yaml", RECIPE.format(method="multitask"))
    base = ["cli.py", "train", "--config", str(cfg), "--json"]
    train_in_one_process(base, tmp_path / "one")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *base,
                          "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, why(two)
    assert two.stdout.count('"iterations": 3') == 1  # rank 0 alone reports
    assert_same_parameters(tmp_path / "one", tmp_path / "two")


@needs_data
def test_two_process_resume_equals_one_uninterrupted_process(tmp_path):
    cfg = write(tmp_path / "r.yaml", RECIPE.format(method="maml").replace("val_every: 3", "val_every: 1"))
    base = ["cli.py", "train", "--config", str(cfg), "--json"]
    train_in_one_process(base, tmp_path / "one")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    first = subprocess.run([*launch, "--master_port", str(free_port()), *base, "--out", str(tmp_path / "two"),
                            "--iterations", "2"], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, why(first)
    resumed = subprocess.run([*launch, "--master_port", str(free_port()), *base, "--out", str(tmp_path / "two"),
                              "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, why(resumed)
    assert resumed.stdout.count('"iterations": 3') == 1  # rank 0 alone reports
    assert_same_parameters(tmp_path / "one", tmp_path / "two")
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # rank 0 alone logged, once per iteration


def test_workers_report_a_bad_recipe_in_one_line(tmp_path):
    cfg = write(tmp_path / "r.yaml", RECIPE.format(method="maml").replace("[omniglot-latin, omniglot-greek]",
                                                                          "[no-such-task]"))
    run = subprocess.run([sys.executable, "cli.py", "train", "--config", str(cfg), "--out", str(tmp_path / "o"),
                          "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no-such-task" in run.stderr
    assert "Traceback" not in run.stderr


@needs_data
def test_workers_train_as_one_process_from_a_script_without_a_main_guard(tmp_path):
    """``workers: 2``: `train` starts the second process itself (no torchrun), with the same result; the
    other ranks are fresh interpreters, not multiprocessing's re-import of the calling script."""
    cfg = write(tmp_path / "r.yaml", RECIPE.format(method="maml"))
    train_in_one_process(["cli.py", "train", "--config", str(cfg), "--json"], tmp_path / "one")
    script = write(tmp_path / "script.py", f"import mtl\nprint(mtl.train({str(cfg)!r}, out={str(tmp_path / 'two')!r}, "
                                           "workers=2, threads=2)['iterations'])\n")
    two = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, why(two)
    assert two.stdout.split() == ["3"]  # rank 0 alone reports
    assert_same_parameters(tmp_path / "one", tmp_path / "two")
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 3
    saved = (tmp_path / "two" / "recipe.yaml").read_text()
    assert "workers: 2" in saved and "threads: 1" in saved  # each process got its share of the cores


def test_workers_beyond_the_meta_batch_are_refused(tmp_path):
    cfg = write(tmp_path / "r.yaml", RECIPE.format(method="maml"))
    run = subprocess.run([sys.executable, "cli.py", "train", "--config", str(cfg), "--out", str(tmp_path / "o"),
                          "--workers", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "workers: 8 is more than the 4 episodes" in run.stderr and "at most 4" in run.stderr

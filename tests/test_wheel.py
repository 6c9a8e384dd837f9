"""The distribution a user installs: a wheel built from the repository carries the shipped task files
and recipes, and, installed away from the checkout, `mtl tasks list` and `mtl tasks validate` run."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_a_wheel_installs_and_runs_away_from_the_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mtl_fewshot-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mtl/_shipped/tasks/omniglot/omniglot.yaml" in names and "mtl/_shipped/configs/smoke.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MTL_OFFLINE": "1"}
    probe = "import mtl, mtl.settings as s; print(mtl.__file__); print(s.BUILTIN_TASKS_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert where.stdout.splitlines()[0].startswith(str(site)), where.stdout + where.stderr
    assert where.stdout.splitlines()[1] == str(site / "mtl" / "_shipped" / "tasks")
    script = site / "bin" / "mtl"
    listed = subprocess.run([str(script), "tasks", "validate", str(site / "mtl" / "_shipped" / "tasks"), "--no-data"],
                            capture_output=True, text=True, cwd=elsewhere, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.count("ok ") >= 70
    listed = subprocess.run([str(script), "tasks", "list", "--json"], capture_output=True, text=True, cwd=elsewhere,
                            env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert '"omniglot"' in listed.stdout and '"clinc150-travel"' in listed.stdout

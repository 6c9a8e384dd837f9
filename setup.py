"""Build hook: the shipped task files and recipes (top-level ``tasks/`` and ``configs/`` in the
repository) travel inside the wheel as ``mtl/_shipped/``, where an installed ``mtl`` finds them."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        here = Path(__file__).parent
        for folder in ("tasks", "configs"):
            shutil.copytree(here / folder, Path(self.build_lib) / "mtl" / "_shipped" / folder, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithShippedFiles})

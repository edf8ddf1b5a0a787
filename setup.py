"""Build hook only (the metadata is in pyproject.toml): the wheel carries ``conf/`` and ``recipes/``.

The top-level ``conf/`` and ``recipes/`` stay the source users edit in a clone (an editable install
reads them in place). A wheel or ``pip install .`` gets a copy inside the package,
``nemodiff_train/_configs/conf`` with the recipes as ``conf/recipe/`` (a real folder: the clone's
``conf/recipe`` symlink does not survive every archive format), which ``nemodiff_train/config/load.py``
finds through the package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGED = Path("nemodiff_train") / "_configs" / "conf"


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``conf/`` (without its ``recipe`` link) and ``recipes/`` into the build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: config/load.py reads the clone's folders, which stay editable
        for needed in ("conf/config.yaml", "recipes"):
            if not (ROOT / needed).exists():
                raise FileNotFoundError(f"{ROOT / needed} is missing: the wheel would carry no configs")
        target = Path(self.build_lib) / PACKAGED
        shutil.rmtree(target.parent, ignore_errors=True)
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "conf", target, ignore=lambda d, names: [*skip(d, names),
                                                                         *(["recipe"] if Path(d) == ROOT / "conf" else [])])
        shutil.copytree(ROOT / "recipes", target / "recipe", ignore=skip)


setup(cmdclass={"build_py": BuildPyWithConfigs})

"""mypy on the modules ``[tool.mypy] files`` lists, under the names they are installed as.

The folders ``edge_app/``, ``train/``, ``convert/`` and ``benchmarks/`` install as ``bmc.edge_app``
and so on (``[tool.setuptools.package-dir]``), which mypy cannot see from the source tree: checked
by path, ``from bmc.edge_app.config import ModelConfig`` would not resolve, and
``ignore_missing_imports`` would make it ``Any``. Here a temporary tree of symbolic links lays the
folders out as installed (``bmc/edge_app -> edge_app``), mypy reads it through ``MYPYPATH`` and
checks each listed module by its import name, so that every import between the project's own
modules is the real, typed module.

Run from the repository root: ``python3 .ci/typecheck.py`` (``.ci/run`` does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {folder: name for name, folder in project["tool"]["setuptools"]["package-dir"].items()}
    folders["bmc"] = "bmc"
    modules = []
    for entry in project["tool"]["mypy"]["files"]:
        # a folder stands for every module of its packages (a folder without __init__.py, such as
        # edge_app/deploy's scripts, is no package)
        paths = (
            [p.relative_to(ROOT) for p in sorted((ROOT / entry).rglob("*.py")) if (p.parent / "__init__.py").is_file()]
            if (ROOT / entry).is_dir()
            else [Path(entry)]
        )
        for f in paths:
            top, *rest = f.with_suffix("").parts
            modules += ["-m", ".".join([folders[top], *rest]).removesuffix(".__init__")]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "bmc"
        pkg.mkdir()
        for entry in (ROOT / "bmc").iterdir():
            (pkg / entry.name).symlink_to(entry)
        for folder, name in folders.items():
            if name != "bmc":
                (pkg / name.split(".", 1)[1]).symlink_to(ROOT / folder)
        env = {**os.environ, "MYPYPATH": tmp}
        # files = [] on the command line: the modules named here, not the paths pyproject lists
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *modules]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Resolve the edge requirements for the boards clinics use, binary wheels only, with pip.

For each target (OS, Python version, glibc) it runs ``pip install --dry-run --only-binary=:all:
--platform manylinux_2_X_aarch64 ... --python-version V`` on the edge extra's requirements and
fails if any dependency has no wheel there, or if TensorFlow sneaks into the resolution. Catches
a dependency without arm64 wheels before a clinic does. Needs PyPI; not part of the default test
run's network-free core (``tests/test_deploy.py`` runs it, marked slow).

    python edge_app/deploy/check_wheels.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
# (board / OS, Python, glibc of that OS)
TARGETS = [
    ("Jetson, Ubuntu 22.04 (JetPack 6)", "3.10", 35),
    ("Raspberry Pi OS Bookworm", "3.11", 36),
    ("Debian Trixie", "3.13", 41),
]


def edge_requirements() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(meta["dependencies"]) + list(meta["optional-dependencies"]["edge"])


def for_target(reqs: list[str], python: str) -> list[str]:
    """Requirements whose environment markers hold on the target. pip evaluates the markers of
    command-line requirements against the running interpreter, not ``--python-version``."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": python + ".0", "platform_machine": "aarch64",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out = []
    for r in reqs:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def resolve(python: str, glibc: int, reqs: list[str]) -> dict:
    """pip's resolution for an aarch64 target (a dry run: metadata only, no wheel downloads)."""
    reqs = for_target(reqs, python)
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, glibc + 1)]
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
               "--ignore-installed", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--target", str(Path(d) / "target"), "--report", str(report)]
        for p in platforms:
            cmd += ["--platform", p]
        p = subprocess.run(cmd + reqs, capture_output=True, text=True, timeout=900)
        installs = json.loads(report.read_text())["install"] if report.exists() else []
    wheels = sorted(i["download_info"]["url"].rsplit("/", 1)[-1] for i in installs)
    names = sorted(i["metadata"]["name"].lower().replace("_", "-") for i in installs)
    ok = p.returncode == 0 and bool(installs) and all(w.endswith(".whl") for w in wheels) and not any(
        n in ("tensorflow", "keras", "tensorflow-cpu") for n in names)
    return {"ok": ok, "wheels": wheels, "packages": names, "error": p.stderr.strip()[-2000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    reqs = edge_requirements()
    results, bad = {}, 0
    for name, py, glibc in TARGETS:
        r = resolve(py, glibc, reqs)
        results[f"{name} / Python {py}"] = r
        status = "OK" if r["ok"] else "FAIL"
        print(f"{status}  {name}, Python {py}, aarch64: {', '.join(r['wheels']) or r['error']}")
        bad += not r["ok"]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

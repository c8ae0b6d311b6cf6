"""Resolve the edge requirements for the boards clinics use, binary wheels only, with pip.

For each target (OS, Python version, glibc) it runs ``pip install --dry-run --only-binary=:all:
--platform manylinux_2_X_aarch64 ... --python-version V`` on the edge extra's requirements and
fails if any dependency has no wheel there, or if TensorFlow sneaks into the resolution. Catches
a dependency without arm64 wheels before a clinic does. Needs PyPI; not part of the default test
run's network-free core (``tests/test_deploy.py`` runs it, marked slow).

``--size`` also installs those aarch64 wheels, with this package's own wheel, into a folder per
target (``pip install --target --platform``: the files a device's ``site-packages`` gets, byte
for byte, .pyc included) and reports the installed size of the device's virtual environment
against the 200 MB budget, package by package. The environment is counted as the installer
leaves it: those packages plus pip (kept for upgrades); setuptools is removed (nothing needs it
at run time).

    python edge_app/deploy/check_wheels.py [--size] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from slim import size_bytes, slim  # the script beside this one (run as a script, its folder is on the path)

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

    env = {
        "python_version": python,
        "python_full_version": python + ".0",
        "platform_machine": "aarch64",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--disable-pip-version-check",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--target",
            str(Path(d) / "target"),
            "--report",
            str(report),
        ]
        for p in platforms:
            cmd += ["--platform", p]
        p = subprocess.run(cmd + reqs, capture_output=True, text=True, timeout=900)
        installs = json.loads(report.read_text())["install"] if report.exists() else []
    wheels = sorted(i["download_info"]["url"].rsplit("/", 1)[-1] for i in installs)
    names = sorted(i["metadata"]["name"].lower().replace("_", "-") for i in installs)
    ok = (
        p.returncode == 0
        and bool(installs)
        and all(w.endswith(".whl") for w in wheels)
        and not any(n in ("tensorflow", "keras", "tensorflow-cpu") for n in names)
    )
    return {"ok": ok, "wheels": wheels, "packages": names, "error": p.stderr.strip()[-2000:]}


BUDGET_MB = 200.0


def own_wheel(dest: Path) -> Path:
    """This checkout built as a wheel (pure Python + the shipped models)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(dest),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return next(dest.glob("bmc_edge-*.whl"))


def pip_mb() -> float:
    """pip as a fresh virtual environment has it (pure Python: the same on every platform)."""
    import venv

    with tempfile.TemporaryDirectory() as d:
        venv.create(d, with_pip=True)
        site = next(Path(d).glob("lib/python3*/site-packages"))
        return sum(size_bytes(p) for p in site.iterdir() if p.name.lower().startswith("pip")) / 1e6


def installed_size(python: str, glibc: int, wheel: Path) -> dict:
    """Unpack the aarch64 wheels of ``wheel[edge]`` for a target; MB per top-level entry."""
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, glibc + 1)]
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "site-packages"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--target",
            str(target),
        ]
        for p in platforms:
            cmd += ["--platform", p]
        p = subprocess.run(cmd + [f"{wheel}[edge]"], capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            return {"ok": False, "error": p.stderr.strip()[-2000:]}
        freed = sum(mb for _, mb, _ in slim(target))
        parts: dict[str, float] = {}
        for entry in target.iterdir():
            mb = size_bytes(entry) / 1e6
            key = (
                entry.name.split("-")[0].split(".libs")[0].lower()
                if entry.name.endswith((".dist-info", ".libs"))
                else entry.name.lower()
            )
            parts[key] = parts.get(key, 0.0) + mb
    return {
        "ok": True,
        "packages_mb": {k: round(v, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "site_packages_mb": round(sum(parts.values()), 1),
        "slimmed_mb": round(freed, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--size", action="store_true", help="also install the aarch64 wheels and report the size")
    ap.add_argument("--python", help="only the target with this Python version (e.g. 3.11)")
    a = ap.parse_args(argv)
    targets = [t for t in TARGETS if a.python in (None, t[1])]
    if not targets:
        ap.error(f"no target with Python {a.python}; targets: {', '.join(t[1] for t in TARGETS)}")
    reqs = edge_requirements()
    results, bad = {}, 0
    for name, py, glibc in targets:
        r = resolve(py, glibc, reqs)
        results[f"{name} / Python {py}"] = r
        status = "OK" if r["ok"] else "FAIL"
        print(f"{status}  {name}, Python {py}, aarch64: {', '.join(r['wheels']) or r['error']}")
        bad += not r["ok"]
    if a.size:
        with tempfile.TemporaryDirectory() as d:
            wheel = own_wheel(Path(d))
            base = pip_mb()
            for name, py, glibc in targets:
                r = installed_size(py, glibc, wheel)
                results[f"{name} / Python {py}"]["size"] = r
                if not r["ok"]:
                    print(f"FAIL  size of {name}, Python {py}: {r['error']}")
                    bad += 1
                    continue
                total = r["site_packages_mb"] + base
                r["venv_mb"] = round(total, 1)
                r["pip_mb"] = round(base, 1)
                big = ", ".join(f"{k} {v:.0f}" for k, v in list(r["packages_mb"].items())[:5])
                status = "OK" if total <= BUDGET_MB else "OVER"
                print(
                    f"{status}  {name}, Python {py}, aarch64: edge environment {total:.0f} MB "
                    f"(budget {BUDGET_MB:.0f}): {big}, pip {base:.0f} MB; {r['slimmed_mb']:.0f} MB slimmed"
                )
                bad += total > BUDGET_MB
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The device install: a virtual environment with only ``.[edge]`` runs the edge app, no TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import venv

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_edge_extra_alone_runs_the_app(tmp_path, bccd):
    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          f"{ROOT}[edge]"], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    size_mb = sum(f.stat().st_size for f in env_dir.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    print(f"edge virtual environment: {size_mb:.0f} MB")
    # TensorFlow alone would add well over a gigabyte; OpenCV, LiteRT and numpy are ~350 MB on x86-64
    assert size_mb < 600, f"the installed edge environment is {size_mb:.0f} MB"
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "tensorflow" not in listed.lower() and "keras" not in listed.lower(), listed
    fields = tmp_path / "fields"
    fields.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:5]:
        (fields / f.name).symlink_to(f)
    out = tmp_path / "session"
    run = subprocess.run([str(env_dir / "bin" / "bmc"), "edge", "run", str(fields), "--out", str(out), "--headless"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "session finished: 5 frames" in run.stdout
    assert (out / "cells.csv").read_text().count("\n") > 1
    # and nothing it imported pulled TensorFlow in
    probe = subprocess.run([str(py), "-c", "import sys, bmc.cli, edge_app.app, edge_app.report; "
                            "print('tensorflow' in sys.modules)"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "False", probe.stderr

"""Shared fixtures: the real data sets in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BMC_DATA", ROOT.parent / "shared" / "data"))
# The suite's figures and file names are LiteRT's: on a machine with ONNX Runtime installed too, the
# shipped model's default runtime would be whichever is faster there. tests/test_onnx.py checks that
# choice itself, with this pin lifted.
os.environ["BMC_RUNTIME"] = "litert"
# times are shown in the device's time zone: the tests (and the subprocesses they start) read UTC,
# whatever the machine's zone, unless a test sets one
os.environ["TZ"] = "UTC"
time.tzset()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"test data not found at {path}: the shared data folder must sit beside the "
            "repository (../shared/data) or BMC_DATA must point at it"
        )
    return path


@pytest.fixture(scope="session")
def pbc() -> Path:
    return _need(DATA / "pbc")


@pytest.fixture(scope="session")
def matek() -> Path:
    return _need(DATA / "matek-bm-samples")


@pytest.fixture(scope="session")
def bccd() -> Path:
    return _need(DATA / "bccd")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # ported backbone weights are cached per test session, not in the user's home
    os.environ.setdefault("BMC_CACHE", str(tmp_path_factory.mktemp("bmc-cache")))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def small_class_folders(src: Path, dst: Path, per_class: int, classes=None) -> Path:
    """Link ``per_class`` real images of each class of ``src`` into ``dst`` (a class-folder set)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        if classes and cls.name not in classes:
            continue
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


CLASSES = ("eosinophil", "lymphocyte", "neutrophil", "platelet")


# a model that never saw BCCD's microscope: the PBC-only model shipped until session 10 (commit
# 9c5761e), kept for the tests of adapting to a foreign microscope; the shipped model has since been
# taught by half of BCCD's fields, so that BCCD is no longer foreign to it
PBC_ONLY_MODEL = ROOT / "tests" / "fixtures" / "pbc_only" / "bmc_pbc8_lite0_int8.tflite"


def recorded_session(fields, tmp_path_factory, name: str = "recorded", model=None) -> Path:
    """A real session folder: ``fields`` (image paths) linked into a folder and run through the
    shipped model (or ``model``), as ``bmc edge run`` does; tests copy it before they change it."""
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig

    src = tmp_path_factory.mktemp("fields")
    for f in fields:
        (src / f.name).symlink_to(f)
    out = tmp_path_factory.mktemp(name) / "s"
    clf = CellClassifier(model or DEFAULT_MODEL, threads=2)
    EdgeSession(str(src), clf, out, SessionConfig(), echo=lambda m: None).run()
    return out


def bmc(*args, check=True, timeout=900, env=None):
    """Run the real ``bmc`` CLI in a subprocess."""
    p = subprocess.run(
        [sys.executable, "-m", "bmc.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"bmc {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@contextlib.contextmanager
def serving(app, threads: int = 2):
    """The screen's WSGI ``app`` served by waitress on 127.0.0.1 (a free port) in a thread of its
    own; yields the port, and stops the loop from its own thread on the way out (a plain close from
    here closes sockets under the loop's select: "Bad file descriptor")."""
    from waitress import create_server

    from bmc.edge_app.ui.app import stop_from_another_thread

    server = create_server(app, host="127.0.0.1", port=0, threads=threads)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.effective_port
    finally:
        stop_from_another_thread(server, thread)


@pytest.fixture(scope="session")
def small_pbc(tmp_path_factory, pbc):
    """16 real PBC images of 4 classes, plus one corrupt file."""
    d = small_class_folders(pbc, tmp_path_factory.mktemp("pbc4"), 16, CLASSES)
    (d / "lymphocyte" / "LY_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return d


@pytest.fixture(scope="session")
def run(tmp_path_factory, small_pbc):
    """A real (small) training run: Lite0 from ImageNet, head plus one fine-tuned block."""
    out = tmp_path_factory.mktemp("run") / "lite0"
    bmc(
        "train",
        small_pbc,
        "--out",
        out,
        "--views",
        "2",
        "--head-epochs",
        "25",
        "--fine-tune-epochs",
        "1",
        "--fine-tune-from",
        "block7a",
        "--seed",
        "3",
    )
    return out

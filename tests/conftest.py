"""Shared fixtures: the real data sets in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BMC_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data not found at {path}: the shared data folder must sit beside the "
                    "repository (../shared/data) or BMC_DATA must point at it")
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

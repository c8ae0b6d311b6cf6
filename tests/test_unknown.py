"""Cells the model does not know: set aside as unknown, counted in no class, first in review and in
the report — with the shipped model on real Munich artefacts and blasts and held-out PBC cells."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bmc.card import card_path
from bmc.edge_app import config as config_mod
from bmc.edge_app import review, sessiondb, unknown
from bmc.edge_app.classifier import DEFAULT_MODEL, MODELS_DIR, CellClassifier

from conftest import DATA, bmc


def _rows(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "cells.csv")))


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, matek):
    out = tmp_path_factory.mktemp("art") / "s"
    bmc("edge", "run", matek / "ART", "--mode", "cell", "--out", out, "--headless")
    return out


def test_the_shipped_models_carry_a_calibration_from_their_validation_split():
    for variant in ("int8", "fp16"):
        card = json.loads(card_path(MODELS_DIR / f"bmc_pbc8_lite0_{variant}.tflite").read_text())
        calib = card["unknown"]
        assert calib["n"] >= 1000 and "validation" in calib["data"]
        thresholds = [t for _, t in calib["levels"]]
        assert thresholds == sorted(thresholds) and thresholds[0] > 0  # a higher level lets more cells pass
    clf = CellClassifier(DEFAULT_MODEL, threads=1)
    assert clf.unknown.at(0).threshold is None and not clf.unknown.at(0).flag(5.0)
    # a cell of the reference itself is at distance 0
    assert float(unknown.distances(clf.unknown.reference[:3], clf.unknown.reference).max()) < 1e-5


def test_artefacts_are_set_aside_as_unknown_and_counted_in_no_class(artefacts):
    rows = _rows(artefacts)
    flagged = [r for r in rows if r["flag"].startswith("unknown")]
    assert len(rows) == 100 and len(flagged) >= 80  # the target: >= 80% of the 100 artefacts
    assert all(r["counted_as"] == "" for r in flagged)
    # first in the review queue and in the report, with their number
    db = sessiondb.connect(artefacts)
    queue = review.queue(sessiondb.cells(db))
    db.close()
    assert all(c.unknown for c in queue[: len(flagged)])
    bmc("edge", "report", artefacts)
    html = (artefacts / "report.html").read_text()
    assert f"{len(flagged)} unlike any cell the model knows, first" in html
    db = sqlite3.connect(artefacts / "session.sqlite")
    config = json.loads(db.execute("SELECT config FROM session").fetchone()[0])
    db.close()
    assert config["unknown"]["level"] == 0.98 and config["unknown"]["threshold"] > 0


def test_blasts_are_set_aside_and_the_level_loosens_or_turns_the_check_off(matek, tmp_path):
    out = tmp_path / "bla"
    bmc("edge", "run", matek / "BLA", "--mode", "cell", "--out", out, "--headless")
    assert sum(r["flag"].startswith("unknown") for r in _rows(out)) >= 5  # of 7 blasts
    off = tmp_path / "off"
    p = bmc("edge", "run", matek / "BLA", "--mode", "cell", "--out", off, "--headless", "--unknown-level", "0")
    assert not any(r["flag"].startswith("unknown") for r in _rows(off)) and "unknown" not in p.stdout
    p = bmc(
        "edge",
        "run",
        matek / "BLA",
        "--mode",
        "cell",
        "--out",
        tmp_path / "bad",
        "--headless",
        "--unknown-level",
        "0.5",
        check=False,
    )
    assert p.returncode == 2 and "--unknown-level" in p.stderr and "0.9" in p.stderr


def test_few_held_out_pbc_cells_are_set_aside(tmp_path):
    rows = list(csv.DictReader(open(MODELS_DIR / "bmc_pbc8_lite0_test_split.csv")))
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r["path"])
    folder = tmp_path / "cells"
    folder.mkdir()
    for paths in by.values():
        for p in paths[:6]:
            (folder / Path(p).name).symlink_to(DATA / p)
    out = tmp_path / "s"
    bmc("edge", "run", folder, "--mode", "cell", "--out", out, "--headless")
    got = _rows(out)
    assert len(got) == 48 and sum(r["flag"].startswith("unknown") for r in got) <= 3


def test_the_level_is_checked_in_the_config(tmp_path):
    cfg = tmp_path / "bmc.toml"
    cfg.write_text("[review]\nunknown_level = 0.5\n")
    with pytest.raises(config_mod.ConfigError, match="unknown_level"):
        config_mod.load(cfg)
    cfg.write_text("[review]\nunknown_level = 0.995\n")
    assert config_mod.load(cfg).review.unknown_level == 0.995


def test_a_model_card_without_a_calibration_counts_as_before(tmp_path):
    for f in ("bmc_pbc8_lite0_int8.tflite", "bmc_pbc8_lite0_int8.guard.npz"):
        shutil.copy(MODELS_DIR / f, tmp_path / f)
    card = json.loads(card_path(DEFAULT_MODEL).read_text())
    del card["unknown"]
    (tmp_path / "bmc_pbc8_lite0_int8.json").write_text(json.dumps(card))
    clf = CellClassifier(tmp_path / "bmc_pbc8_lite0_int8.tflite", threads=1)
    assert clf.unknown is None
    # a guard set replaced behind the card's back is refused, not trusted as the reference
    card["unknown"] = json.loads(card_path(DEFAULT_MODEL).read_text())["unknown"]
    (tmp_path / "bmc_pbc8_lite0_int8.json").write_text(json.dumps(card))
    with np.load(tmp_path / "bmc_pbc8_lite0_int8.guard.npz") as z:
        parts = dict(z)
    parts["embedding"] = parts["embedding"][::-1].copy()
    np.savez_compressed(tmp_path / "bmc_pbc8_lite0_int8.guard.npz", **parts)
    with pytest.raises(unknown.UnknownError, match="sha256"):
        CellClassifier(tmp_path / "bmc_pbc8_lite0_int8.tflite", threads=1)

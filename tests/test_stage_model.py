"""The shipped stage model (bmc_pbc11_stages): its card and hierarchy, both levels counted by the edge
app, report and cells.csv, and evaluated at both levels — on held-out real PBC images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bmc.card import load_card
from bmc.edge_app.classifier import MODELS_DIR, CellClassifier
from bmc.stages import GRANULOCYTIC_SERIES, PARENT, STAGE_LABELS

from conftest import DATA, bmc

STAGES = MODELS_DIR / "bmc_pbc11_stages_int8.tflite"


def _held_out(per_class: int, coarse: bool = False) -> dict[str, list[Path]]:
    by: dict[str, list[Path]] = {}
    for r in csv.DictReader(open(MODELS_DIR / "bmc_pbc11_stages_test_split.csv")):
        label = PARENT.get(r["label"], r["label"]) if coarse else r["label"]
        by.setdefault(label, []).append(DATA / r["path"])
    return {label: paths[::7][:per_class] for label, paths in by.items()}


def test_the_stage_model_ships_with_its_hierarchy_gate_and_unknown_check():
    for variant in ("int8", "fp16"):
        card, contract = load_card(MODELS_DIR / f"bmc_pbc11_stages_{variant}.tflite", require_deployable=True)
        assert set(contract.labels) == set(STAGE_LABELS)
        assert contract.parents == {s: PARENT[s] for s in GRANULOCYTIC_SERIES}
        assert card["validation"]["passed"] and card["guard"] and card["unknown"]["n"] > 1000
    int8 = load_card(STAGES)[0]["validation"]
    assert int8["accuracy_drop_points"] <= 0.5  # the bound: int8 within half a point of float
    readme = (MODELS_DIR / "bmc_pbc11_stages.md").read_text()
    assert "--label-from stage" in readme and "promyelocyte → ig" in readme
    assert len(list(csv.DictReader(open(MODELS_DIR / "bmc_pbc11_stages_test_split.csv")))) > 1400
    clf = CellClassifier(STAGES, threads=1)
    assert clf.unknown is not None and clf.has_embedding


def test_a_session_counts_both_levels(tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    for paths in _held_out(3).values():
        for p in paths:
            (folder / p.name).symlink_to(p)
    out = tmp_path / "s"
    bmc("edge", "run", folder, "--mode", "cell", "--out", out, "--headless", "--model", STAGES, "--specimen", "marrow")
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert len(rows) == 33
    counted = [r for r in rows if r["counted_as"]]
    assert counted and all(r["counted_as_class"] == PARENT.get(r["counted_as"], r["counted_as"]) for r in counted)
    assert any(r["counted_as_class"] != r["counted_as"] for r in counted)  # some stage counted into its class
    bmc("edge", "report", out)
    html = (out / "report.html").read_text()
    assert "Granulocytic series" in html and "8-class differential" in html and "Myeloid : erythroid" in html
    for stage in GRANULOCYTIC_SERIES:
        assert f"<td>{stage}</td>" in html


def test_evaluate_reports_both_levels_and_how_far_stage_errors_miss(tmp_path):
    data = tmp_path / "stages"
    for label, paths in _held_out(8).items():
        (data / label).mkdir(parents=True)
        for p in paths:
            (data / label / p.name).symlink_to(p)
    p = bmc("evaluate", STAGES, data, "--json", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 88 and m["accuracy"] >= 0.8 and m["coarse"]["accuracy"] >= m["accuracy"]
    e = m["stage_errors"]
    assert e["errors"] == e["one_stage_off"] + e["further_in_series"] + e["other"]
    assert "8-class level" in p.stdout and "one stage off" in p.stdout and "unknown-cell check" in p.stdout
    # data labelled with the 8 classes only (PBC's class folders): scored at that level
    coarse = tmp_path / "coarse"
    for label, paths in _held_out(6, coarse=True).items():
        (coarse / label).mkdir(parents=True)
        for path in paths:
            (coarse / label / path.name).symlink_to(path)
    p = bmc("evaluate", STAGES, coarse, "--json", tmp_path / "c.json")
    c = json.loads((tmp_path / "c.json").read_text())
    assert "scored at the 8-class" in p.stdout and c["level"].startswith("8-class") and c["accuracy"] >= 0.9


@pytest.mark.parametrize("model", ["bmc_pbc11_stages_int8.tflite", "bmc_pbc8_lite0_int8.tflite"])
def test_munich_cells_are_scored_at_the_models_own_level(model, matek, tmp_path):
    bmc("bench", "generalisation", MODELS_DIR / model, "--matek", matek, "--json", tmp_path / "g.json")
    m = json.loads((tmp_path / "g.json").read_text())
    names = set(m["confusion_labels"])
    assert ("band" in names) == ("stages" in model) and m["n"] >= 30

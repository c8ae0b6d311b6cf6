"""Maturation stages: labels from the PBC file names, their hierarchy, the neighbour-aware targets,
and a split relabelled at the finer level (real PBC files)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from bmc.contract import Contract, ContractError
from bmc.stages import (
    GRANULOCYTIC_SERIES,
    PARENT,
    STAGE_LABELS,
    coarse_counts,
    coarse_probs,
    parents_for,
    series_counts,
    soft_targets,
    stage_distance,
)
from bmc.train.data import discover, load_split, relabel, save_split, split

from conftest import bmc


def test_stage_labels_come_from_the_file_names_and_unspecified_stages_are_left_out(pbc):
    samples = discover(pbc, "stage")
    counts = Counter(s.label for s in samples)
    assert set(counts) == set(STAGE_LABELS)
    # the counts of the data's README
    assert (
        counts["promyelocyte"],
        counts["myelocyte"],
        counts["metamyelocyte"],
        counts["band"],
        counts["segmented"],
    ) == (346, 666, 594, 956, 964)
    assert not any(p.split("/")[-1].split("_")[0] in ("IG", "NEUTROPHIL") for p in (s.path for s in samples))
    assert len(samples) == 10_007 - 117


def test_a_split_relabelled_keeps_its_partition(pbc, tmp_path):
    parts = split(discover(pbc, "folder"), seed=5)
    save_split(parts, tmp_path / "split.json")
    fine, dropped = relabel(load_split(tmp_path / "split.json"), "stage")
    assert dropped == 117
    for part in ("train", "val", "test"):
        coarse = {s.path: s.label for s in parts[part]}
        for s in fine[part]:
            assert s.path in coarse  # the same partition: no test image moved into training
            assert PARENT.get(s.label, s.label) == coarse[s.path]  # each stage sits in its class
    # and from the command line, with the count of images left out
    p = bmc(
        "data",
        "split",
        pbc,
        "--label-from",
        "stage",
        "--like",
        tmp_path / "split.json",
        "--out",
        tmp_path / "stages.json",
    )
    assert "11 classes" in p.stdout and "117 images without a stage label left out" in p.stdout
    assert json.loads((tmp_path / "stages.json").read_text())["test"][0]["label"] in STAGE_LABELS


def test_neighbouring_stages_share_the_target():
    labels = sorted(STAGE_LABELS)
    t = soft_targets(labels, 0.05, 0.1)
    assert np.allclose(t.sum(1), 1.0)
    i = {l: k for k, l in enumerate(labels)}
    my = t[i["myelocyte"]]
    # a myelocyte's neighbours (promyelocyte, metamyelocyte) share 0.1; distant stages get only the smoothing
    assert my[i["promyelocyte"]] == pytest.approx(0.05 / 11 + 0.05)
    assert my[i["metamyelocyte"]] == pytest.approx(0.05 / 11 + 0.05)
    assert my[i["segmented"]] == pytest.approx(0.05 / 11)
    assert my[i["myelocyte"]] == pytest.approx(1 - 0.05 - 0.1 + 0.05 / 11)
    # the ends of the series have one neighbour; a class outside it keeps plain label smoothing
    assert t[i["segmented"]][i["band"]] == pytest.approx(0.05 / 11 + 0.1)
    assert np.allclose(t[i["basophil"]], np.eye(11)[i["basophil"]] * 0.95 + 0.05 / 11)
    assert stage_distance("promyelocyte", "segmented") == 4 and stage_distance("basophil", "band") is None
    with pytest.raises(ValueError, match="add up"):
        soft_targets(labels, 0.5, 0.6)


def test_the_hierarchy_travels_in_the_contract_and_sums_to_the_8_classes():
    labels = sorted(STAGE_LABELS)
    c = Contract(labels=tuple(labels), parents=parents_for(labels))
    back = Contract.from_json(c.to_json())
    assert back.parents == {
        "promyelocyte": "ig",
        "myelocyte": "ig",
        "metamyelocyte": "ig",
        "band": "neutrophil",
        "segmented": "neutrophil",
    }
    assert "parents" not in Contract(labels=("a", "b")).to_dict()  # an 8-class card reads as before
    with pytest.raises(ContractError, match="does not have"):
        Contract(labels=("a", "b"), parents={"c": "a"})
    probs = np.full((2, 11), 1 / 11, np.float32)
    coarse, names = coarse_probs(probs, labels, back.parents)
    assert names == ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
    assert np.allclose(coarse.sum(1), 1) and coarse[0, names.index("ig")] == pytest.approx(3 / 11)
    counts = {"band": 3, "segmented": 7, "myelocyte": 2, "lymphocyte": 5}
    assert coarse_counts(counts, back.parents) == {"neutrophil": 10, "ig": 2, "lymphocyte": 5}
    assert series_counts(counts) == [(s, counts.get(s, 0)) for s in GRANULOCYTIC_SERIES]

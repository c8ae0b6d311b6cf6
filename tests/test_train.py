"""``bmc train`` and ``bmc evaluate`` end to end, on real PBC images, in subprocesses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CLASSES, bmc, small_class_folders


@pytest.mark.slow
def test_run_folder_holds_everything_to_reproduce_and_convert(run, small_pbc):
    for name in (
        "config.json",
        "split.json",
        "labels.txt",
        "contract.json",
        "history.json",
        "model.keras",
        "metrics.json",
        "confusion.png",
        "per_class.md",
        "bmc.train.log",
    ):
        assert (run / name).is_file(), name
    contract = json.loads((run / "contract.json").read_text())
    assert contract["labels"] == list(CLASSES)
    assert contract["stain_norm"] == "stretch"  # the default: the device normalises as training did
    r, g, b = contract["lamp"]  # the training images' background: CellaVision's cream, measured
    assert 240 <= r <= 255 and r - b > 25
    split = json.loads((run / "split.json").read_text())
    paths = [s["path"] for part in split.values() for s in part]
    assert len(paths) == len(set(paths)) == 65  # 64 real images + the corrupt one
    history = json.loads((run / "history.json").read_text())
    assert {h["phase"] for h in history} >= {"head", "fine-tune", "timings"}


@pytest.mark.slow
def test_unreadable_image_is_skipped_and_listed(run):
    m = json.loads((run / "metrics.json").read_text())
    log = (run / "bmc.train.log").read_text()
    assert "LY_corrupt.jpg" in log
    listed = [s["path"] for s in m["skipped"]]
    split = json.loads((run / "split.json").read_text())
    in_test = any(s["path"].endswith("LY_corrupt.jpg") for s in split["test"])
    assert in_test == any(p.endswith("LY_corrupt.jpg") for p in listed)


@pytest.mark.slow
def test_trained_model_beats_chance_on_its_test_split(run):
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] >= 8
    # 4 classes, 11 training images each, mostly a head on ImageNet features: well above 25%
    assert m["accuracy"] >= 0.5, m


@pytest.mark.slow
def test_evaluate_keras_model_json(run, small_pbc, tmp_path):
    out = tmp_path / "eval.json"
    p = bmc("evaluate", run / "model.keras", small_pbc, "--json", out)
    m = json.loads(out.read_text())
    assert {"accuracy", "macro_f1", "n", "per_class", "ece", "confusion_matrix"} <= set(m)
    assert set(m["per_class"]) >= set(CLASSES)
    assert m["n"] == 64 and len(m["skipped"]) == 1
    for v in m["per_class"].values():
        assert {"precision", "recall", "f1", "support"} <= set(v)
    assert "macro-F1" in p.stdout
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 64 and abs(np.trace(cm) / 64 - m["accuracy"]) < 1e-9


@pytest.mark.slow
def test_evaluate_on_the_held_out_part_of_a_split(run, tmp_path):
    out = tmp_path / "test.json"
    bmc("evaluate", run / "model.keras", "--split", run / "split.json", "--json", out)
    m, trained = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    assert m["n"] == trained["n"] and m["accuracy"] == pytest.approx(trained["accuracy"])
    p = bmc("evaluate", run / "model.keras", check=False)
    assert p.returncode == 2 and "DATA_DIR or --split" in p.stderr


@pytest.mark.slow
def test_evaluate_on_another_microscope_maps_folder_case(run, bccd, tmp_path):
    d = small_class_folders(bccd / "wbc_crops", tmp_path / "bccd", 5, ("Eosinophil", "Lymphocyte", "Neutrophil"))
    out = tmp_path / "e.json"
    bmc("evaluate", run / "model.keras", d, "--json", out)
    assert set(json.loads(out.read_text())["per_class"]) >= {"eosinophil", "lymphocyte", "neutrophil"}


@pytest.mark.slow
def test_evaluate_unknown_labels_is_an_error_listing_them(run, matek):
    p = bmc("evaluate", run / "model.keras", matek, check=False)
    assert p.returncode == 2
    assert "not known to the model" in p.stderr and "BLA" in p.stderr and "eosinophil" in p.stderr


@pytest.mark.slow
def test_model_without_contract_is_refused(run, small_pbc, tmp_path):
    lonely = tmp_path / "model.keras"
    lonely.write_bytes((run / "model.keras").read_bytes())
    p = bmc("evaluate", lonely, small_pbc, check=False)
    assert p.returncode == 2 and "no contract found" in p.stderr


def test_data_check_cli(matek, tmp_path):
    out = tmp_path / "check.json"
    p = bmc("data", "check", matek, "--json", out)
    assert "ART" in p.stdout and "imbalance" in p.stdout
    r = json.loads(out.read_text())
    assert r["counts"]["ART"] == 100 and r["imbalance"] == 100.0


def test_impossible_settings_are_one_clear_line(small_pbc, tmp_path):
    p = bmc("train", small_pbc, "--out", tmp_path / "r", "--views", "0", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: views must be >= 1, got 0"


def test_too_small_class_fails_training_with_its_name(matek, tmp_path):
    p = bmc("train", matek, "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "too small to split" in p.stderr and "PEB" in p.stderr


@pytest.mark.slow
def test_full_path_trains_end_to_end(small_pbc, tmp_path):
    """The GPU path (online augmentation in worker processes) runs on the CPU too, one short epoch a
    phase: it lists the corrupt image wherever the split put it, keeps its best weights on disk as
    it goes, and saves a plain float32 model with no optimizer state."""
    out = tmp_path / "full"
    bmc(
        "train",
        small_pbc,
        "--out",
        out,
        "--mode",
        "full",
        "--head-epochs",
        "1",
        "--fine-tune-epochs",
        "1",
        "--fine-tune-from",
        "block7a",
        "--batch-size",
        "16",
        "--strategy",
        "default",
        "--mixed-precision",
        "on",
    )
    m = json.loads((out / "metrics.json").read_text())
    log = (out / "bmc.train.log").read_text()
    assert m["n"] >= 8 and "mode full" in log and "mixed precision: mixed_float16" in log
    assert "LY_corrupt.jpg" in log + json.dumps(m["skipped"])
    assert (out / "best.weights.h5").is_file()
    import keras

    model = keras.models.load_model(out / "model.keras")
    assert getattr(model, "optimizer", None) is None and model.dtype_policy.name == "float32"
    assert (out / "model.keras").stat().st_size < 16e6  # weights only: ~14 MB for Lite0


@pytest.mark.slow
def test_vgg16_comparison_row_trains_converts_and_counts(small_pbc, bccd, tmp_path):
    """The seed's VGG16 as a comparison backbone, from random weights here (Keras's ImageNet weights
    need a download): trained on both paths' cut at its own blocks, converted and gated class by
    class, and the int8 file classifies a camera field's cells on the device with its embedding."""
    from bmc.edge_app.classifier import CellClassifier

    out = tmp_path / "vgg"
    p = bmc(
        "train",
        small_pbc,
        "--out",
        out,
        "--backbone",
        "vgg16",
        "--weights",
        "none",
        "--input-size",
        "64",
        "--head-epochs",
        "1",
        "--fine-tune-epochs",
        "1",
        "--fine-tune-from",
        "block5",
        "--batch-size",
        "16",
    )
    assert "phase 2 (fine-tune from block5)" in (out / "bmc.train.log").read_text(), p.stderr[-2000:]
    bad = bmc(
        "train",
        small_pbc,
        "--out",
        tmp_path / "bad",
        "--backbone",
        "vgg16",
        "--weights",
        "none",
        "--input-size",
        "64",
        "--fine-tune-from",
        "block6a",
        check=False,
    )
    assert bad.returncode == 2 and "unknown block 'block6a' for vgg16" in bad.stderr and "block5" in bad.stderr
    full = bmc("train", small_pbc, "--out", tmp_path / "bad2", "--backbone", "vgg16", "--mode", "full", check=False)
    assert full.returncode == 2 and "unknown block 'block6a'" in full.stderr  # before any epoch, on both paths
    assert not (tmp_path / "bad2").exists()
    bmc("convert", out, "--name", "vgg16_random", "--variants", "int8")
    clf = CellClassifier(out / "tflite" / "vgg16_random_int8.tflite")
    assert clf.has_embedding and clf.contract.input_size == 64
    field = next((bccd / "JPEGImages").glob("*.jpg"))
    session = tmp_path / "session"
    bmc(
        "edge",
        "run",
        field.parent,
        "--out",
        session,
        "--model",
        out / "tflite" / "vgg16_random_int8.tflite",
        "--max-frames",
        "2",
    )
    assert (session / "report.html").is_file()


@pytest.mark.slow
def test_init_from_a_trained_model(run, small_pbc, pbc, tmp_path):
    """--init-from starts from a trained model: with no epochs, the very same model; with other
    classes, its backbone and a fresh head; a test split it was trained on is reported."""
    import keras

    same = tmp_path / "same"
    p = bmc(
        "train",
        small_pbc,
        "--split",
        run / "split.json",
        "--init-from",
        run / "model.keras",
        "--mode",
        "full",
        "--head-epochs",
        "0",
        "--fine-tune-epochs",
        "0",
        "--out",
        same,
    )
    assert "and its head (same classes)" in (same / "bmc.train.log").read_text()
    a = keras.models.load_model(run / "model.keras").get_weights()
    b = keras.models.load_model(same / "model.keras").get_weights()
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert (
        json.loads((same / "metrics.json").read_text())["accuracy"]
        == json.loads((run / "metrics.json").read_text())["accuracy"]
    )
    assert "optimistic" not in p.stdout  # its own split: no test image was trained on

    three = small_class_folders(pbc, tmp_path / "three", 16, CLASSES[:3])
    other = tmp_path / "other"
    bmc(
        "train",
        three,
        "--init-from",
        run / "model.keras",
        "--mode",
        "full",
        "--head-epochs",
        "0",
        "--fine-tune-epochs",
        "0",
        "--seed",
        "11",
        "--out",
        other,
    )
    log = (other / "bmc.train.log").read_text()
    assert "head starts afresh (4 classes there, 3 here)" in log
    assert "test figures are optimistic" in log  # another split of the same images

    p = bmc("train", small_pbc, "--init-from", run / "metrics.json", "--out", tmp_path / "bad", check=False)
    assert p.returncode == 2 and "--init-from needs a trained model.keras" in p.stderr

"""``bmc convert``: real TFLite variants of a real trained model, validated and self-describing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmc.card import ModelCardError, load_card

from conftest import bmc


@pytest.fixture(scope="session")
def converted(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    # generous gate: 4 classes with 4 test images each, one flipped cell is a 25-point recall drop
    p = bmc(
        "convert",
        run,
        "--out",
        out,
        "--name",
        "cells",
        "--variants",
        "float16,int8",
        "--max-drop",
        "30",
        "--max-class-drop",
        "60",
        "--representative",
        "24",
    )
    return out, p


@pytest.mark.slow
def test_variants_are_written_with_cards_and_a_report(converted, run):
    out, p = converted
    report = json.loads((out / "cells_conversion.json").read_text())
    assert [r["variant"] for r in report["variants"]] == ["float16", "int8"]
    for r in report["variants"]:
        assert {
            "size_mb",
            "accuracy",
            "macro_f1",
            "agreement",
            "accuracy_drop_points",
            "worst_class",
            "passed",
            "mean_abs_prob_diff",
        } <= set(r)
    assert "| int8 |" in (out / "cells_conversion.md").read_text() and "| int8 |" in p.stdout
    card, contract = load_card(out / "cells_int8.tflite", require_deployable=True)
    assert contract.labels == tuple(json.loads((run / "contract.json").read_text())["labels"])
    assert contract.stain_norm == "stretch"  # the card carries the normalisation to the device
    assert card["source_model"]["sha256"] and card["validation"]["n"] == report["n"]
    assert (out / "cells_int8.tflite").stat().st_size < 5e6


@pytest.mark.slow
def test_int8_takes_uint8_pixels_and_uses_only_int8_ops(converted):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(converted[0] / "cells_int8.tflite"))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    scale, zero = inp["quantization"]
    # calibrated on 0..255 pixels: one grey level per step (not 1/255: the known pitfall)
    assert 0.9 < scale < 1.1 and zero == 0
    ops = it._get_ops_details()
    assert len(ops) > 50 and "DEQUANTIZE" not in {d["op_name"] for d in ops}
    float_outputs = [
        (d["op_name"], t) for d in ops for t in d["outputs"] if it._get_tensor_details(t, 0)["dtype"] == np.float32
    ]
    assert not float_outputs, float_outputs


@pytest.mark.slow
def test_tflite_matches_keras_with_stated_tolerances(converted, run, small_pbc):
    import keras

    from bmc.contract import Contract, preprocess, read_image
    from bmc.train.evaluate import TFLiteClassifier

    contract = Contract.from_json((run / "contract.json").read_text())
    xs = np.stack([preprocess(read_image(str(f)), contract) for f in sorted(small_pbc.glob("*/*_*[0-9].jpg"))[:24]])
    ref = keras.models.load_model(run / "model.keras").predict(xs, verbose=0)
    fp16 = TFLiteClassifier(converted[0] / "cells_fp16.tflite").predict(xs)
    int8 = TFLiteClassifier(converted[0] / "cells_int8.tflite").predict(xs)
    assert np.abs(fp16 - ref).max() < 0.02
    assert (fp16.argmax(1) == ref.argmax(1)).mean() == 1.0
    assert np.abs(int8 - ref).mean() < 0.05
    assert (int8.argmax(1) == ref.argmax(1)).mean() >= 0.85


@pytest.mark.slow
def test_failed_gate_exits_non_zero_names_variant_and_classes(run, tmp_path):
    # an impossible gate (recall may not move at all, accuracy must rise by 100 points)
    p = bmc(
        "convert",
        run,
        "--out",
        tmp_path,
        "--variants",
        "dynamic",
        "--max-drop",
        "-100",
        "--representative",
        "8",
        check=False,
    )
    assert p.returncode == 2
    assert "variant dynamic failed the gate" in p.stderr and "not marked deployable" in p.stderr
    card = json.loads((tmp_path / "bmc_dynamic.json").read_text())
    assert card["deployable"] is False
    with pytest.raises(ModelCardError, match="not marked deployable"):
        load_card(tmp_path / "bmc_dynamic.tflite", require_deployable=True)


@pytest.mark.slow
def test_card_missing_or_not_matching_is_refused(converted, tmp_path):
    src = converted[0] / "cells_int8.tflite"
    copy = tmp_path / "m.tflite"
    copy.write_bytes(src.read_bytes())
    with pytest.raises(ModelCardError, match="no model card"):
        load_card(copy)
    (tmp_path / "m.json").write_text((converted[0] / "cells_int8.json").read_text())
    load_card(copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="does not match its model card"):
        load_card(copy)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_card(copy)


def test_calibration_in_the_wrong_range_is_refused():
    from bmc.convert.variants import VariantError, int8

    with pytest.raises(VariantError, match="0..1"):
        int8(np.random.default_rng(0).random((4, 224, 224, 3)))


@pytest.mark.slow
def test_variants_give_the_cell_embedding_beside_the_scores(converted):
    """Every converted variant outputs the pooled embedding (for adaptation on the device) from the
    same invocation, and its own last layer, read back from the file, maps it to its scores."""
    from bmc.convert.embedding import read_head
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.head import softmax

    x = np.random.default_rng(1).uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)
    for name, tol in (("cells_int8", 0.02), ("cells_fp16", 1e-4)):
        path = converted[0] / f"{name}.tflite"
        clf = CellClassifier(path, require_deployable=False, orientations=1)
        assert clf.card["outputs"] == ["probabilities", "embedding"] and clf.has_embedding
        probs, emb = clf.predict_cells(x)
        assert emb.shape == (3, 1280) and clf.card["embedding"]["size"] == 1280
        w, b = read_head(path)
        assert np.abs(softmax(emb @ w + b) - probs).max() < tol

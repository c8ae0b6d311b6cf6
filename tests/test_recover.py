"""The float Keras model recovered from the shipped float16 file (bmc.train.recover), and AdaBN on it
(bmc.train.adabn): the same scores as LiteRT gives, and batch-norm statistics that move only where
the cells differ."""

from __future__ import annotations

import numpy as np
import pytest

from bmc.benchmarks import ood
from bmc.card import load_card
from bmc.contract import prepare, read_image

from conftest import ROOT, bmc, small_class_folders

FP16 = ROOT / "edge_app" / "models" / "bmc_pbc8_lite0_fp16.tflite"
INT8 = ROOT / "edge_app" / "models" / "bmc_pbc8_lite0_int8.tflite"


@pytest.fixture(scope="module")
def cells(pbc):
    """24 held-out PBC cells (every class) as the model takes them, and their labels."""
    card, contract = load_card(FP16)
    paths, labels = ood.test_cells(FP16, card, pbc.parent)
    pick = np.linspace(0, len(paths) - 1, 24).astype(int)
    xs = np.stack([prepare(read_image(paths[i]), contract, "BGR") for i in pick]).astype(np.float32)
    return contract, xs, [labels[i] for i in pick]


@pytest.fixture(scope="module")
def recovered(cells):
    from bmc.train.recover import recover

    contract, xs, _ = cells
    return recover(FP16, contract, source=xs[:16])


def _litert(path, xs):
    from bmc.edge_app.classifier import CellClassifier

    clf = CellClassifier(path, orientations=1)
    return clf.predict_cells(xs)


def test_recovered_model_scores_as_the_float16_file(cells, recovered):
    contract, xs, labels = cells
    ours = np.asarray(recovered.predict(xs, verbose=0))
    theirs, _ = _litert(FP16, xs)
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    right = np.mean([contract.labels[i] == l for i, l in zip(ours.argmax(1), labels)])
    assert right >= 0.9  # the shipped model on its own held-out cells


def test_adabn_on_the_training_cells_changes_nothing_and_on_others_moves_the_statistics(cells, recovered, bccd):
    """Re-estimated on cells like those it was measured on, a layer keeps its statistics (the
    outputs stay); on BCCD's camera cells they move."""
    from bmc.benchmarks.generalisation import bccd_cells
    from bmc.train.adabn import adapt_batchnorm

    contract, xs, _ = cells
    weights = recovered.get_weights()
    before = np.asarray(recovered.predict(xs[:16], verbose=0))
    try:
        assert adapt_batchnorm(recovered, xs[:16], first="block7a") == 4  # block7a's three and top_bn
        same = np.asarray(recovered.predict(xs[:16], verbose=0))
        assert np.abs(same - before).max() < 1e-3
        bn = recovered.get_layer("top_bn")
        kept = bn.moving_mean.numpy().copy()
        foreign, _ = bccd_cells(bccd, contract)
        adapt_batchnorm(recovered, foreign[:16].astype(np.float32), first="top")
        assert np.abs(bn.moving_mean.numpy() - kept).max() > 0.01
    finally:
        recovered.set_weights(weights)


def test_an_int8_file_is_refused_with_a_reason(cells):
    from bmc.train.recover import RecoverError, recover

    with pytest.raises(RecoverError, match="quantised.*float16"):
        recover(INT8, cells[0])


def test_training_starts_from_the_shipped_file(pbc, cells, tmp_path):
    """bmc train --init-from takes the float16 file a device holds: with no epochs, the run's model
    is the recovered one, head and all (the same eight classes), and scores as the file does."""
    import keras

    contract, xs, _ = cells
    data = small_class_folders(pbc, tmp_path / "pbc8", 4)
    out = tmp_path / "from_tflite"
    bmc(
        "train", data, "--init-from", FP16, "--out", out, "--mode", "full",
        "--head-epochs", "0", "--fine-tune-epochs", "0",
    )  # fmt: skip
    log = (out / "bmc.train.log").read_text()
    assert "recovered the float model" in log and "and its head (same classes)" in log
    trained = np.asarray(keras.models.load_model(out / "model.keras").predict(xs[:8], verbose=0))
    assert np.abs(trained - _litert(FP16, xs[:8])[0]).max() < 1e-3

"""Does AdaBN bring another microscope's cells within reach? (``bmc bench adabn``)

The shipped float model is recovered from its float16 file (:mod:`bmc.train.recover`), its
BatchNormalization statistics measured on training cells of the Barcelona split (the PBC images
not in the model's test split). BCCD's single-white-cell fields are cut at the session's scale
and split in two halves at random: the statistics are re-estimated (:mod:`bmc.train.adabn`) on
one half's cells, without their labels, and the other half is scored; then the other way round.

Each variant is scored against the same model without AdaBN on the same half:
- balanced accuracy and recall per class (every cell);
- the share of cells *known* (cosine distance to the nearest of the PBC reference cells, embedded
  by the same model, within the 98% quantile of other PBC training cells' distances: the device's
  unknown-cell rule, in float) and confident (top probability ≥ 0.6), and their balanced accuracy:
  the cells a session would count unaided.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.benchmarks.generalisation import DEFAULT_BCCD, DEFAULT_PBC, bccd_cells, data_folder
from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS

DEFAULT_FP16 = Path(__file__).resolve().parent.parent / "edge_app" / "models" / "bmc_pbc8_lite0_fp16.tflite"
#: (lowest layer re-estimated, share of the new statistics): full AdaBN, the top blocks, the last
#: layer, and blends
VARIANTS = ((None, 1.0), ("block6a", 1.0), ("top", 1.0), (None, 0.3))


def _training_cells(pbc: Path, model: Path, card, contract, n: int, seed: int) -> np.ndarray:
    """``n`` PBC images the model was trained on (not in its shipped test split), as it takes them."""
    from bmc.benchmarks.ood import test_cells
    from bmc.contract import prepare, read_image

    test = {str(Path(p).resolve()) for p in test_cells(model, card, pbc.parent)[0]}
    train = sorted(p for p in pbc.rglob("*.jpg") if str(p.resolve()) not in test)
    pick = np.random.default_rng(seed).choice(len(train), min(n, len(train)), replace=False)
    return np.stack([prepare(read_image(str(train[i])), contract, "BGR") for i in pick]).astype(np.float32)


def _balanced(pred: np.ndarray, y: np.ndarray, labels) -> tuple[float, dict[str, float]]:
    recall = {labels[c]: float(np.mean(pred[y == c] == c)) for c in sorted(set(y.tolist()))}
    return (float(np.mean(list(recall.values()))) if recall else float("nan")), recall


def run(
    model=DEFAULT_FP16,
    bccd=DEFAULT_BCCD,
    pbc=DEFAULT_PBC,
    variants=VARIANTS,
    orientations: int = DEFAULT_ORIENTATIONS,
    source_cells: int = 480,
    seed: int = 0,
    log=print,
) -> dict:
    import keras

    from bmc.card import load_card
    from bmc.edge_app.classifier import predict_oriented
    from bmc.train.adabn import adapt_batchnorm
    from bmc.train.recover import recover

    model = Path(model)
    bccd, pbc = data_folder(bccd, "--bccd"), data_folder(pbc, "--pbc")
    card, contract = load_card(model)
    src = _training_cells(pbc, model, card, contract, source_cells, seed)
    half = len(src) // 2
    net = recover(model, contract, source=src[:half])
    log(f"recovered {model.name}; statistics of {half} PBC training cells")
    xs, names = bccd_cells(bccd, contract)
    xs = xs.astype(np.float32)
    labels = list(contract.labels)
    y = np.array([labels.index(n) for n in names])

    def unit(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    pooled = keras.Model(net.input, net.get_layer("avg_pool").output)  # shares net's weights as they change

    def embed(x):
        return unit(np.asarray(pooled.predict(x, verbose=0)))

    reference = embed(src[half:])
    threshold = float(np.quantile(1 - (embed(src[:half]) @ reference.T).max(1), 0.98))

    def judge(x, yy):
        def predict(b):
            return np.asarray(net.predict(b, verbose=0))

        p = np.concatenate([predict_oriented(predict, x[i : i + 32], orientations) for i in range(0, len(x), 32)])
        known = (1 - (embed(x) @ reference.T).max(1)) <= threshold
        counted = known & (p.max(1) >= 0.6)
        bal, recall = _balanced(p.argmax(1), yy, labels)
        return {
            "balanced_accuracy": bal,
            "recall": recall,
            "counted_share": float(counted.mean()),
            "balanced_accuracy_counted": _balanced(p.argmax(1)[counted], yy[counted], labels)[0],
        }

    order = np.random.default_rng(seed).permutation(len(xs))
    folds = [(order[: len(xs) // 2], order[len(xs) // 2 :]), (order[len(xs) // 2 :], order[: len(xs) // 2])]
    weights = net.get_weights()
    before = [judge(xs[score], y[score]) for _, score in folds]
    rows = []
    for first, weight in variants:
        for k, (fit, score) in enumerate(folds):
            net.set_weights(weights)
            adapt_batchnorm(net, xs[fit], first=first, weight=weight)
            after = judge(xs[score], y[score])
            rows.append({"first": first or "stem", "weight": weight, "fold": k, "before": before[k], "after": after})
            log(
                f"AdaBN from {first or 'stem'}, weight {weight}, half {k + 1}: balanced accuracy "
                f"{before[k]['balanced_accuracy']:.3f} -> {after['balanced_accuracy']:.3f}; counted unaided "
                f"{before[k]['counted_share']:.0%} at {before[k]['balanced_accuracy_counted']:.3f} -> "
                f"{after['counted_share']:.0%} at {after['balanced_accuracy_counted']:.3f}"
            )
    net.set_weights(weights)
    return {
        "model": model.name,
        "bccd": str(bccd),
        "cells": len(xs),
        "orientations": orientations,
        "source_cells": len(src),
        "known_threshold": threshold,
        "rows": rows,
    }


def markdown(r: dict) -> str:
    lines = [
        "| re-estimated from | weight | half | balanced acc. before → after | E / L / M / N recall after "
        "| counted unaided before → after (balanced acc.) |",
        "|---|---:|---:|---|---|---|",
    ]
    for row in r["rows"]:
        b, a = row["before"], row["after"]
        rec = " / ".join(
            f"{a['recall'].get(c, float('nan')):.2f}" for c in ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
        )
        lines.append(
            f"| {row['first']} | {row['weight']} | {row['fold'] + 1} | {b['balanced_accuracy']:.3f} → "
            f"{a['balanced_accuracy']:.3f} | {rec} | {b['counted_share']:.0%} ({b['balanced_accuracy_counted']:.3f}) → "
            f"{a['counted_share']:.0%} ({a['balanced_accuracy_counted']:.3f}) |"
        )
    return "\n".join(lines)

"""Classification metrics from scikit-learn, in one JSON-ready dictionary.

Calibration error is the expected calibration error (ECE, Guo et al. 2017) over 15 equal-width
confidence bins: scikit-learn has no multi-class ECE, so it is computed here from the top-1
confidence and correctness.
"""

from __future__ import annotations

import numpy as np


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, balanced accuracy, per-class P/R/F1/support, confusion matrix, ECE.

    Only classes present in ``y_true`` or predicted are reported per class; ``labels`` is the
    model's full label list, so that predictions of classes absent from the data still count.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 f1_score, precision_recall_fscore_support)

    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    idx = sorted(set(present) | set(y_pred.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    per_class = {labels[i]: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                             "support": int(s[k])} for k, i in enumerate(idx)}
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # macro over the classes present in the data: a class absent from DATA_DIR has no recall
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "ece": expected_calibration_error(probs, y_true),
        "per_class": per_class,
        "confusion_labels": [labels[i] for i in idx],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
    }


def per_class_table(m: dict) -> str:
    """A Markdown table of per-class precision / recall / F1 / support."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, v in m["per_class"].items():
        lines.append(f"| {label} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    lines.append(f"\naccuracy {m['accuracy']:.4f} · macro-F1 {m['macro_f1']:.4f} · balanced accuracy "
                 f"{m['balanced_accuracy']:.4f} · ECE {m['ece']:.4f} · n = {m['n']}")
    return "\n".join(lines)


def plot_confusion(m: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(m["confusion_matrix"], dtype=float)
    labels = m["confusion_labels"]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

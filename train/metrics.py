"""Classification metrics in numpy (the device has no scikit-learn), in one JSON-ready dictionary.

The definitions are scikit-learn's (``tests/test_metrics.py`` checks them against it where it is
installed): macro-F1 over the classes present in the data, balanced accuracy as the mean recall of
those classes, precision 0 for a class never predicted. Calibration error is the expected
calibration error (ECE, Guo et al. 2017) over 15 equal-width confidence bins, from the top-1
confidence and correctness.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A classifier's figures on one labelled set. ``per_class`` holds the classes in the data or
    predicted; ``confusion_matrix`` is over ``confusion_labels`` (rows true, columns predicted)."""

    n: int
    accuracy: float
    macro_f1: float  # over the classes present in the data
    balanced_accuracy: float  # mean recall of the classes present in the data
    ece: float  # expected calibration error, 15 bins
    per_class: dict[str, ClassScores]
    confusion_labels: list[str]
    confusion_matrix: list[list[int]]

    @property
    def recall(self) -> dict[str, float]:
        return {c: v.recall for c, v in self.per_class.items()}

    def to_dict(self) -> dict:
        """JSON-ready (``metrics.json``, ``--json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        """Back from :meth:`to_dict`'s JSON (a ``metrics.json`` may hold more keys beside these)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["per_class"] = {c: ClassScores(**v) for c, v in d["per_class"].items()}
        return cls(**kw)


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


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> Metrics:
    """Accuracy, macro-F1, balanced accuracy, per-class P/R/F1/support, confusion matrix, ECE.

    Only classes present in ``y_true`` or predicted are reported per class; ``labels`` is the
    model's full label list, so that predictions of classes absent from the data still count.
    """
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    idx = sorted(set(present) | set(y_pred.tolist()))
    cm = confusion(y_true, y_pred, idx)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    per_class = {
        labels[i]: ClassScores(float(p[k]), float(r[k]), float(f[k]), int(support[k])) for k, i in enumerate(idx)
    }
    in_data = [idx.index(c) for c in present]
    return Metrics(
        n=int(len(y_true)),
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=float(f[in_data].mean()),
        balanced_accuracy=float(r[in_data].mean()),
        ece=expected_calibration_error(probs, y_true),
        per_class=per_class,
        confusion_labels=[labels[i] for i in idx],
        confusion_matrix=cm.tolist(),
    )


def confusion(y_true, y_pred, classes) -> np.ndarray:
    """Counts of (true, predicted) pairs over ``classes`` (rows true, columns predicted); pairs
    outside ``classes`` are left out, as scikit-learn's ``confusion_matrix(labels=...)`` does."""
    pos = {c: k for k, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), np.int64)
    for t, q in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()):
        if t in pos and q in pos:
            cm[pos[t], pos[q]] += 1
    return cm


def per_class_table(m: Metrics) -> str:
    """A Markdown table of per-class precision / recall / F1 / support."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, v in m.per_class.items():
        lines.append(f"| {label} | {v.precision:.3f} | {v.recall:.3f} | {v.f1:.3f} | {v.support} |")
    lines.append(
        f"\naccuracy {m.accuracy:.4f} · macro-F1 {m.macro_f1:.4f} · balanced accuracy "
        f"{m.balanced_accuracy:.4f} · ECE {m.ece:.4f} · n = {m.n}"
    )
    return "\n".join(lines)


def plot_confusion(m: Metrics, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(m.confusion_matrix, dtype=float)
    labels = m.confusion_labels
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {m.accuracy:.3f}, macro-F1 {m.macro_f1:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""A class head applied on the device in numpy: ``softmax(embedding @ w + b)``.

An adapted model (``bmc edge adapt``) is the shipped ``.tflite`` unchanged plus such a head, fitted
at the laboratory on its reviewed cells; the model's card names the head's file and sha256, and
:class:`bmc.edge_app.classifier.CellClassifier` applies it to the embedding the ``.tflite`` gives beside its
own class scores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bmc.card import ModelCard, ModelCardError, file_beside


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


@dataclasses.dataclass(frozen=True)
class Head:
    w: np.ndarray  # embedding x classes
    b: np.ndarray  # classes
    labels: tuple[str, ...]
    file: str = ""
    sha256: str = ""
    # the reviewed cells' embeddings it was fitted on: known ground for the unknown-cell check
    reference: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        z: np.ndarray = embedding @ self.w + self.b
        return z

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        return softmax(self.logits(embedding)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as fh:  # np.savez would add '.npz' to a name without it
            arrays: dict[str, Any] = {
                "w": self.w.astype(np.float32),
                "b": self.b.astype(np.float32),
                "labels": np.asarray(self.labels),
            }
            if self.reference is not None:
                arrays["reference"] = self.reference.astype(np.float16)
            np.savez(fh, **arrays)


def load_head(model_path: str | Path, card: ModelCard) -> Head:
    """The head the card names (``card.head``), beside ``model_path``, checked against its sha256 and shape."""
    spec = card.head
    if spec is None:
        raise ModelCardError(f"{model_path}: its card names no head")
    path = file_beside(model_path, spec, "head")
    try:
        with np.load(path) as z:
            w, b, labels = z["w"].astype(np.float32), z["b"].astype(np.float32), tuple(str(l) for l in z["labels"])
            reference = z["reference"].astype(np.float32) if "reference" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        raise ModelCardError(f"{path}: not a readable head ({e})") from e
    if w.ndim != 2 or w.shape[1] != len(labels) or b.shape != (len(labels),):
        raise ModelCardError(f"{path}: weights {w.shape} and bias {b.shape} do not fit its {len(labels)} labels")
    return Head(w, b, labels, path.name, spec["sha256"], reference)

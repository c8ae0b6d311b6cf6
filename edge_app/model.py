"""A self-describing cell classifier on the device: a ``.tflite`` file and its model card.

Preprocessing, labels and cell scale come from the card (``bmc.card``), never from guesses; a
missing or mismatched card, a truncated file or an op the runtime lacks is a clear error naming
the file.

A cell has no up: ``orientations`` (1, 2, 4 or 8) classifies each cell in that many of its
rotations and mirror images, in one batched invocation, and averages the probabilities. It
steadies the answer on cells from a microscope the model never saw, at that many times the
classification cost (``benchmarks/README.md`` has both sides of the trade).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.card import load_card
from bmc.contract import preprocess
from edge_app import backends

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "bmc_pbc8_lite0_int8.tflite"
ORIENTATIONS = (1, 2, 4, 8)
DEFAULT_ORIENTATIONS = 4


def oriented(batch: np.ndarray, n: int) -> np.ndarray:
    """``n`` dihedral views of each image of an NHWC batch, view-major: (n * N, H, W, C)."""
    if n not in ORIENTATIONS:
        raise ValueError(f"orientations must be one of {ORIENTATIONS}, got {n}")
    if n == 1:
        return batch
    views = [batch, batch[:, :, ::-1]] if n == 2 else \
        [np.rot90(batch, k, axes=(1, 2)) for k in range(4)]
    if n == 8:
        views += [np.rot90(batch[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(views))


def predict_oriented(predict, batch: np.ndarray, n: int) -> np.ndarray:
    """``predict`` (model inputs → probabilities) on ``n`` orientations of each input, in one call,
    averaged back to one row per input."""
    return predict(oriented(batch, n)).reshape(n, len(batch), -1).mean(axis=0)


class CellClassifier:
    def __init__(self, path: str | Path = DEFAULT_MODEL, threads: int | None = None, backend: str = "litert",
                 require_deployable: bool = True, orientations: int = DEFAULT_ORIENTATIONS):
        if orientations not in ORIENTATIONS:
            raise ValueError(f"orientations must be one of {ORIENTATIONS}, got {orientations}")
        self.orientations = orientations
        self.path = Path(path)
        self.card, self.contract = load_card(self.path, require_deployable=require_deployable)
        self.backend = backends.create(backend, str(self.path), threads)
        shape = self.backend.inp["shape"] if hasattr(self.backend, "inp") else None
        if shape is not None and (int(shape[1]), int(shape[2])) != (self.contract.input_size,) * 2:
            raise backends.BackendError(
                f"{self.path}: input is {int(shape[1])}x{int(shape[2])} but its card says "
                f"{self.contract.input_size}x{self.contract.input_size}")
        self.labels = list(self.contract.labels)
        self.sha256 = self.card["sha256"]

    def classify(self, crops: list[np.ndarray], pixel_format: str = "BGR", crop: bool = False) -> np.ndarray:
        """Probabilities for cell crops already cut at the trained scale (``crop=False``)."""
        if not crops:
            return np.zeros((0, len(self.labels)), np.float32)
        return self.predict(np.stack([preprocess(c, self.contract, pixel_format, crop=crop) for c in crops]))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for preprocessed model inputs, averaged over the classifier's orientations."""
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return predict_oriented(self.backend.predict, batch, self.orientations)

"""A self-describing cell classifier on the device: a ``.tflite`` file and its model card.

Preprocessing, labels and cell scale come from the card (``bmc.card``), never from guesses; a
missing or mismatched card, a truncated file or an op the runtime lacks is a clear error naming
the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.card import load_card
from bmc.contract import preprocess
from edge_app import backends

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "bmc_pbc8_lite0_int8.tflite"


class CellClassifier:
    def __init__(self, path: str | Path = DEFAULT_MODEL, threads: int | None = None, backend: str = "litert",
                 require_deployable: bool = True):
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
        batch = np.stack([preprocess(c, self.contract, pixel_format, crop=crop) for c in crops])
        return self.backend.predict(batch)

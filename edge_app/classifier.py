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

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bmc.card import ModelCardError, load_card
from bmc.contract import preprocess
from bmc.edge_app import backends, unknown
from bmc.edge_app.head import load_head

EMBEDDING, PROBABILITIES = "embedding", "probabilities"

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
    views = [batch, batch[:, :, ::-1]] if n == 2 else [np.rot90(batch, k, axes=(1, 2)) for k in range(4)]
    if n == 8:
        views += [np.rot90(batch[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(views))


def predict_oriented(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, n: int) -> np.ndarray:
    """``predict`` (model inputs → probabilities) on ``n`` orientations of each input, in one call,
    averaged back to one row per input."""
    return np.asarray(predict(oriented(batch, n)).reshape(n, len(batch), -1).mean(axis=0))


class CellClassifier:
    """A model file, its card and, for a model adapted at a laboratory, the head its card names.

    ``predict_cells`` gives each cell's class probabilities and, where the model exposes it, its
    embedding (both averaged over the orientations); an adapted model's probabilities come from its
    own head applied to that embedding. On load, the model's outputs are checked against its card:
    a model with more or fewer class scores than the card has labels is refused."""

    def __init__(
        self,
        path: str | Path = DEFAULT_MODEL,
        threads: int | None = None,
        backend: str | None = None,  # None: the one the file's format needs (backends.for_file)
        require_deployable: bool = True,
        orientations: int = DEFAULT_ORIENTATIONS,
        unknown_level: float = unknown.DEFAULT_LEVEL,
    ):
        if orientations not in ORIENTATIONS:
            raise ValueError(f"orientations must be one of {ORIENTATIONS}, got {orientations}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.orientations = orientations
        self.path = Path(path)
        self.card, self.contract = load_card(self.path, require_deployable=require_deployable)
        self.head = load_head(self.path, self.card) if self.card.head else None
        self.backend = backends.create(backend, str(self.path), threads)
        self.labels = list(self.contract.labels)
        self.base_labels = list(self.card.head.get("base_labels", self.labels)) if self.card.head else self.labels
        self.sha256 = self.card.sha256
        self.name = self.card.name
        self.has_embedding = EMBEDDING in self.card.outputs
        self._check_outputs()
        # the unknown-cell check, where the card carries its calibration (None for older models)
        self.unknown = (
            unknown.load(self.path, self.card, unknown_level, self.head.reference if self.head is not None else None)
            if self.has_embedding
            else None
        )

    def _check_outputs(self) -> None:
        where = f"{self.path}"
        shape = self.backend.input_shape
        if (shape[1], shape[2]) != (self.contract.input_size,) * 2:
            raise backends.BackendError(
                f"{where}: input is {shape[1]}x{shape[2]} but its card says "
                f"{self.contract.input_size}x{self.contract.input_size}"
            )
        sizes = self.backend.output_sizes
        names = list(self.card.outputs) or [PROBABILITIES]
        if len(sizes) != len(names):
            raise ModelCardError(
                f"{where}: the model has {len(sizes)} outputs but its card names {len(names)} "
                f"({', '.join(names)}): model and card do not belong together"
            )
        if sizes[0] != len(self.base_labels):
            raise ModelCardError(
                f"{where}: the model gives {sizes[0]} class scores per cell but its card names "
                f"{len(self.base_labels)} labels ({', '.join(self.base_labels)}): model and card do "
                "not belong together"
            )
        if self.head is not None:
            if not self.has_embedding:
                raise ModelCardError(f"{where}: its card names a head but the model gives no embedding")
            if self.head.w.shape[0] != sizes[1] or list(self.head.labels) != self.labels:
                raise ModelCardError(
                    f"{where}: head {self.head.file} ({self.head.w.shape[0]} inputs, labels "
                    f"{', '.join(self.head.labels)}) does not fit the model's {sizes[1]}-number "
                    f"embedding and its card's labels"
                )

    @property
    def description(self) -> str:
        """The model that classifies, as a session and a report name it: file, and head where adapted."""
        text = f"{self.path.name} (sha256 {self.sha256[:12]})"
        if self.head is not None:
            text += f" with head {self.head.file} (sha256 {self.head.sha256[:12]})"
        return text

    def classify(self, crops: list[np.ndarray], pixel_format: str = "BGR", crop: bool = False) -> np.ndarray:
        """Probabilities for cell crops already cut at the trained scale (``crop=False``)."""
        if not crops:
            return np.zeros((0, len(self.labels)), np.float32)
        return self.predict(np.stack([preprocess(c, self.contract, pixel_format, crop=crop) for c in crops]))

    def predict_cells(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, embeddings or None) for preprocessed model inputs, each averaged over the
        classifier's orientations, in one batched invocation."""
        n = self.orientations
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32), (
                np.zeros((0, self.backend.output_sizes[1]), np.float32) if self.has_embedding else None
            )
        outs = self.backend.outputs(oriented(batch, n), 2 if self.has_embedding else 1)
        probs = outs[0].reshape(n, len(batch), -1).mean(axis=0)
        emb = outs[1].reshape(n, len(batch), -1).mean(axis=0) if self.has_embedding else None
        if self.head is not None and emb is not None:
            probs = self.head.probabilities(emb)
        return probs, emb

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for preprocessed model inputs, averaged over the classifier's orientations."""
        return self.predict_cells(batch)[0]

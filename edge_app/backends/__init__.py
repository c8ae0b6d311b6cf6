"""Inference backends: numpy in, numpy out.

One module per runtime, each declaring its ``KEY`` and a :class:`Backend` subclass, found by
discovery; a backend whose runtime is not installed is skipped with the reason logged (after
Frigate's detector plugins). LiteRT (``ai-edge-litert``, or the older ``tflite-runtime`` where
that is what the device has) is the first implementation.
"""

from __future__ import annotations

import abc
import importlib
import logging
import pkgutil

import numpy as np

from bmc.errors import BmcError

log = logging.getLogger(__name__)


class BackendError(BmcError, RuntimeError):
    """A model the runtime cannot load or run; the message names the file."""


class Backend(abc.ABC):
    KEY = ""

    @abc.abstractmethod
    def __init__(self, model_path: str, threads: int | None = None): ...

    @property
    @abc.abstractmethod
    def input_dtype(self) -> np.dtype: ...

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """N x H x W x C of the model's input."""

    @property
    @abc.abstractmethod
    def output_sizes(self) -> tuple[int, ...]:
        """The number of values per input of each output, in the model's output order."""

    @abc.abstractmethod
    def outputs(self, batch: np.ndarray, n_out: int | None = None) -> list[np.ndarray]:
        """``batch``: N x H x W x 3 float32 RGB pixels in 0..255 → the first ``n_out`` outputs
        (all by default), each N x size, float32."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """N x classes probabilities (the model's first output)."""
        return self.outputs(batch, 1)[0]

    @property
    def description(self) -> str:
        """The runtime and where it runs, as ``bmc edge doctor`` says it."""
        return self.KEY


def available() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    for mod in pkgutil.iter_modules(__path__):
        try:
            m = importlib.import_module(f"{__name__}.{mod.name}")
        except ImportError as e:
            log.info("backend %s skipped: %s", mod.name, e)
            continue
        for obj in vars(m).values():
            if isinstance(obj, type) and issubclass(obj, Backend) and obj is not Backend and obj.KEY:
                found[obj.KEY] = obj
    return found


#: the backend a model file's format needs, by its suffix
BY_SUFFIX = {".tflite": "litert", ".onnx": "onnxruntime"}
EXTRA = {"litert": "edge", "onnxruntime": "onnx"}


def for_file(model_path: str) -> str:
    """The backend key of a model file: LiteRT for ``.tflite``, ONNX Runtime for ``.onnx``."""
    suffix = "." + str(model_path).rsplit(".", 1)[-1].lower() if "." in str(model_path) else ""
    if suffix not in BY_SUFFIX:
        raise BackendError(f"{model_path}: not a model file this kit runs (.tflite or .onnx)")
    return BY_SUFFIX[suffix]


def create(key: str | None, model_path: str, threads: int | None = None) -> Backend:
    """The backend ``key`` (None: the one the file's format needs) loaded with ``model_path``."""
    key = key or for_file(model_path)
    backends = available()
    if key not in backends:
        raise BackendError(
            f"backend {key!r} is not available here (have: {', '.join(backends) or 'none'}); "
            f"install its extra: pip install '.[{EXTRA.get(key, 'edge')}]' from the bmc checkout"
        )
    return backends[key](model_path, threads)

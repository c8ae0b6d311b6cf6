"""LiteRT (TensorFlow Lite) interpreter backend, with XNNPACK on CPUs.

Prefers ``ai_edge_litert`` and falls back to the older ``tflite_runtime``. Quantized inputs and
outputs are handled here from the tensors' own scale and zero point; the cells of one frame are
run as one batch when the model lets its batch dimension be resized.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from bmc.edge_app.backends import Backend, BackendError

try:
    from ai_edge_litert.interpreter import Interpreter

    RUNTIME = "ai-edge-litert"
except ImportError:  # pragma: no cover - depends on the device
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef,unused-ignore]

    RUNTIME = "tflite-runtime"

# what the runtime's C++ logger prints to stderr on every interpreter's first allocation: an INFO
# banner with no news for a technician; warnings and errors pass through
_BANNER = re.compile(
    rb"^INFO: (Created TensorFlow Lite XNNPACK delegate for CPU|Initialized TensorFlow Lite runtime)\.\s*$"
)
_stderr_lock = threading.Lock()


@contextlib.contextmanager
def quiet_runtime() -> Iterator[None]:
    """Hold back the runtime's INFO banner: file descriptor 2 goes to a temporary file while the
    interpreter allocates, and every other line is written back to stderr afterwards. The runtime
    has no Python switch for its logger, and ``TF_CPP_MIN_LOG_LEVEL`` does not reach it."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd != 2:  # stderr is not the process's own (a test runner captures it): leave its descriptors be
        yield
        return
    with _stderr_lock, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not _BANNER.match(line)]
            if kept:
                os.write(fd, b"".join(kept))


class LiteRTBackend(Backend):
    KEY = "litert"

    def __init__(self, model_path: str, threads: int | None = None):
        self.path = str(model_path)
        try:
            with quiet_runtime():
                self.interp = Interpreter(model_path=self.path, num_threads=threads)
                self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BackendError(
                f"{self.path}: LiteRT cannot load this model ({e}); is the file truncated, "
                "or built with ops this runtime lacks?"
            ) from e
        self.inp = self.interp.get_input_details()[0]
        self.outs = self.interp.get_output_details()
        self.out = self.outs[0]
        self._batch = 1
        self.batchable = True

    @property
    def input_dtype(self) -> np.dtype:
        dt: np.dtype = np.dtype(self.inp["dtype"])
        return dt

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.inp["shape"])

    @property
    def output_sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(o["shape"][1:])) for o in self.outs)

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        dt = self.inp["dtype"]
        if dt in (np.uint8, np.int8) and scale:
            info = np.iinfo(dt)
            q: np.ndarray = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dt)
            return q
        return np.asarray(x, dtype=dt)

    @staticmethod
    def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
        scale, zero = detail["quantization"]
        out: np.ndarray = y.astype(np.float32)
        if detail["dtype"] in (np.uint8, np.int8) and scale:
            out = (out - zero) * scale
        return out

    def _resize(self, n: int) -> bool:
        if n == self._batch:
            return True
        try:
            shape = list(self.inp["shape"])
            shape[0] = n
            self.interp.resize_tensor_input(self.inp["index"], shape)
            with quiet_runtime():
                self.interp.allocate_tensors()
            self.inp = self.interp.get_input_details()[0]
            self.outs = self.interp.get_output_details()
            self.out = self.outs[0]
            self._batch = n
            return True
        except (ValueError, RuntimeError):
            self.batchable = False
            return False

    def _invoke(self, x: np.ndarray, n_out: int) -> list[np.ndarray]:
        self.interp.set_tensor(self.inp["index"], self._quantize(x))
        self.interp.invoke()
        return [self._dequantize(self.interp.get_tensor(o["index"]), o).reshape(len(x), -1) for o in self.outs[:n_out]]

    def outputs(self, batch: np.ndarray, n_out: int | None = None) -> list[np.ndarray]:
        """The model's first ``n_out`` outputs (all by default) for a batch, dequantized, one row per input."""
        n_out = len(self.outs) if n_out is None else n_out
        if batch.ndim != 4:
            raise ValueError(f"expected N x H x W x 3, got {batch.shape}")
        if len(batch) == 0:
            return [np.zeros((0, size), np.float32) for size in self.output_sizes[:n_out]]
        if self.batchable and len(batch) > 1 and self._resize(len(batch)):
            return self._invoke(batch, n_out)
        if self._batch != 1:
            self._resize(1)
        rows = [self._invoke(x[None], n_out) for x in batch]
        return [np.concatenate([r[k] for r in rows]) for k in range(n_out)]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch, 1)[0]

    @property
    def description(self) -> str:
        from importlib import metadata

        return f"litert ({RUNTIME} {metadata.version(RUNTIME)}, XNNPACK on the CPU)"

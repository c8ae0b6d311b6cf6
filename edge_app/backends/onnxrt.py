"""ONNX Runtime backend, for the ``.onnx`` files ``bmc convert --onnx`` writes (optional extra
``bmc-edge[onnx]``; the edge install does not need it).

The same contract as LiteRT's: float32 RGB 0..255 in, the class scores and the embedding out. An
int8 file is quantised with QDQ nodes inside the graph, so its input and outputs are float32 too.
The execution providers are the ones the machine has, best first (TensorRT, CUDA, then the CPU),
unless ``BMC_ONNX_PROVIDERS`` names them (comma-separated); :attr:`provider` says which runs.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort  # not installed: discovery skips this backend

from bmc.edge_app.backends import Backend, BackendError

RUNTIME = f"onnxruntime {ort.__version__}"
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def providers() -> list[str]:
    """The execution providers to ask for, best first: ``BMC_ONNX_PROVIDERS`` or what is here."""
    wanted = [p.strip() for p in os.environ.get("BMC_ONNX_PROVIDERS", "").split(",") if p.strip()]
    have = ort.get_available_providers()
    return [p for p in (wanted or PREFERRED) if p in have] or ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    KEY = "onnxruntime"

    def __init__(self, model_path: str, threads: int | None = None):
        self.path = str(model_path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: no provider banner for a technician
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds for a bad file
            raise BackendError(f"{self.path}: ONNX Runtime cannot load this model ({e})") from e
        self.inp = self.session.get_inputs()[0]
        self.outs = self.session.get_outputs()
        self.provider = self.session.get_providers()[0]
        self._lock = threading.Lock()  # a session runs one call at a time here, as LiteRT's interpreter does

    @property
    def description(self) -> str:
        return f"onnxruntime ({RUNTIME}, {self.provider})"

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else 1 for d in self.inp.shape)

    @property
    def output_sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod([d for d in o.shape[1:]])) for o in self.outs)

    def outputs(self, batch: np.ndarray, n_out: int | None = None) -> list[np.ndarray]:
        n_out = len(self.outs) if n_out is None else n_out
        if batch.ndim != 4:
            raise ValueError(f"expected N x H x W x 3, got {batch.shape}")
        if len(batch) == 0:
            return [np.zeros((0, size), np.float32) for size in self.output_sizes[:n_out]]
        names = [o.name for o in self.outs[:n_out]]
        with self._lock:
            got = self.session.run(names, {self.inp.name: np.ascontiguousarray(batch, np.float32)})
        return [np.asarray(g, np.float32).reshape(len(batch), -1) for g in got]

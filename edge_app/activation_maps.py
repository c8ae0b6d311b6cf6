"""Where the model looked: class activation maps (Zhou et al. 2016, "Learning deep features for
discriminative localization") of one cell, on the device, in numpy.

The classifier ends ``feature map (7x7x1280) → global average pool → linear head``, so the score
of class ``c`` is the average over the map of ``F(x, y) · w_c``: that product, at each of the 7x7
places, is how much each part of the cell pushed towards ``c``. It is upsampled to the input and
laid over it. The head is the model's own (its card's guard set carries the shipped head's
weights) or, for an adapted model, the head it counts with.

The feature map is an intermediate tensor: a second interpreter of the same file keeps its
tensors for this (LiteRT's ``experimental_preserve_all_tensors``: more memory, so it is used only
for the one cell a person looks at, never in the counting loop).
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

import cv2
import numpy as np

from bmc.errors import BmcError

if TYPE_CHECKING:
    from pathlib import Path

    from bmc.edge_app.classifier import CellClassifier


class MapError(BmcError, ValueError):
    pass


class ActivationMaps:
    def __init__(self, clf: CellClassifier) -> None:
        from bmc.edge_app.adapt import load_guard

        if not clf.has_embedding:
            raise MapError(f"{clf.path.name} gives no embedding: no activation map")
        if clf.head is not None:
            self.w, self.labels = clf.head.w, list(clf.head.labels)
        else:
            guard = load_guard(clf.path, clf.card)
            self.w, self.labels = guard["w"], list(guard["labels"])
        self.clf = clf
        self.features = _OnnxFeatures(clf.path) if clf.path.suffix == ".onnx" else _LiteRTFeatures(clf.path)

    def __call__(self, model_input: np.ndarray, label: str) -> np.ndarray:
        """The map of ``label`` for one preprocessed input (H x W x 3, RGB 0..255), in 0..1, H x W."""
        if label not in self.labels:
            raise MapError(f"{label!r} is not a class of this model")
        f = self.features(model_input[None].astype(np.float32))
        cam: np.ndarray = np.maximum(f @ self.w[:, self.labels.index(label)], 0)
        cam = cv2.resize(cam, model_input.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        cam = np.clip(cam, 0, None)
        return cam / cam.max() if cam.max() > 0 else cam


class _LiteRTFeatures:
    """The feature map under the embedding's pooling, from a second interpreter that keeps its
    intermediate tensors."""

    def __init__(self, path: Path) -> None:
        from bmc.edge_app.backends.litert import quiet_runtime

        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - depends on the device
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef,unused-ignore]

        with warnings.catch_warnings(), quiet_runtime():  # LiteRT warns that keeping tensors costs memory: here only
            warnings.simplefilter("ignore")
            self.interp = Interpreter(model_path=str(path), num_threads=1, experimental_preserve_all_tensors=True)
            self.interp.allocate_tensors()
        # one interpreter, and the screen's threads ask for maps at once: LiteRT is not thread-safe
        self._lock = threading.Lock()
        emb = self.interp.get_output_details()[1]["index"]
        pool = [o for o in self.interp._get_ops_details() if emb in list(o["outputs"])]
        if not pool or pool[0]["op_name"] != "MEAN":
            raise MapError(f"{path.name}: its embedding is not a global average of a feature map")
        self.feature_index = int(pool[0]["inputs"][0])
        self.inp = self.interp.get_input_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        if self.inp["dtype"] in (np.uint8, np.int8) and scale:
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        with self._lock:
            self.interp.set_tensor(self.inp["index"], x.astype(self.inp["dtype"]))
            self.interp.invoke()
            f: np.ndarray = self.interp.get_tensor(self.feature_index)[0].astype(np.float32)
        fs, fz = self.interp._get_tensor_details(self.feature_index, 0)["quantization"]
        return (f - fz) * fs if fs else f


class _OnnxFeatures:
    """The same feature map from an ONNX file: the input of the pooling under the embedding made an
    output of a second session (needs the ``onnx`` package, which the onnx extra brings)."""

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        by_output = {o: n for n in model.graph.node for o in n.output}
        node = by_output.get("embedding")
        for _ in range(8):  # Squeeze / QDQ pairs between the pooling and the output
            if node is None or node.op_type in ("ReduceMean", "GlobalAveragePool"):
                break
            node = by_output.get(node.input[0])
        if node is None:
            raise MapError(f"{path.name}: its embedding is not a global average of a feature map")
        self.nchw = node.op_type == "GlobalAveragePool"
        name = node.input[0]
        model.graph.output.append(onnx.ValueInfoProto(name=name))
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input, self.name = self.session.get_inputs()[0].name, name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        f: np.ndarray
        (f,) = self.session.run([self.name], {self.input: x})
        f = np.asarray(f, np.float32)[0]
        return f.transpose(1, 2, 0) if self.nchw else f


def overlay(model_input: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A BGR picture of the cell as the model saw it with the map laid over it (red: pushed most)."""
    rgb = np.clip(model_input, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap((255 * cam).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1 - alpha, heat, alpha, 0)

"""The class head of an ONNX classifier read back from its graph (for the guard set and the card),
without the exporter's dependencies: ``onnx`` alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.errors import BmcError


class OnnxHeadError(BmcError, ValueError):
    """An ONNX file whose class head cannot be found; the message names it."""


def read_head(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The final layer's weights ``(embedding x classes, classes)`` of an ONNX classifier (dequantised
    where QDQ nodes hold them): the MatMul and Add that feed the Softmax."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output}

    def value(name: str) -> np.ndarray | None:
        if name in init:
            return init[name]
        node = by_output.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            x, scale = init.get(node.input[0]), init.get(node.input[1])
            zero = init.get(node.input[2]) if len(node.input) > 2 else None
            if x is None or scale is None:
                return None
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim:
                shape[axis] = -1
            z = 0 if zero is None else zero.reshape(shape)
            return ((x - z) * scale.reshape(shape)).astype(np.float32)
        if node is not None and node.op_type in ("Identity", "Cast", "QuantizeLinear"):
            return value(node.input[0])
        return None

    soft = next((n for n in graph.node if n.op_type == "Softmax"), None)
    w = b = None
    node = by_output.get(soft.input[0]) if soft is not None else None
    for _ in range(8):  # Add(MatMul(x, W), b), or Gemm(x, W, b), with QDQ pairs in between
        if node is None:
            break
        if node.op_type == "Gemm":
            w, b = value(node.input[1]), value(node.input[2])
            break
        if node.op_type == "Add":
            consts = [value(i) for i in node.input]
            b = next((c for c in consts if c is not None and c.ndim == 1), b)
            node = next((by_output.get(i) for i, c in zip(node.input, consts) if c is None), None)
            continue
        if node.op_type == "MatMul":
            w = value(node.input[1])
            break
        node = by_output.get(node.input[0])
    if w is None or b is None:
        raise OnnxHeadError(f"{path}: no MatMul/Add (or Gemm) before its Softmax; not a bmc classifier")
    return w, b

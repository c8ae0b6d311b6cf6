"""A trainable Keras classifier recovered from a shipped float ``.tflite`` file.

A laboratory that installed the kit holds the model files of ``edge_app/models/``, not the
``model.keras`` they were converted from. The float16 file keeps every weight of the float model,
with each BatchNormalization folded into the convolution before it: ``y = W'x + b'`` with
``W' = γW/σ`` and ``b' = β − γμ/σ``. :func:`recover` rebuilds the classifier (the same layer names
as :func:`bmc.train.model.build_classifier`) and puts the folded weights back: each convolution
takes ``W'``, and its BatchNormalization is set so that it adds ``b'`` on the data the model was
trained on.

The BatchNormalization statistics are those of ``W'x`` on cells of the training laboratory
(``source``, its images as the contract cuts them): ``μ_s``, ``σ_s²``, with ``γ = σ_s`` and
``β = b' + μ_s``. On such cells the layer is then exactly ``W'x + b'``; on another
microscope's cells :mod:`bmc.train.adabn` re-estimates ``μ`` and ``σ²`` there, as AdaBN (Li et al.
2018) does with an unfolded network, which the fold would otherwise make impossible. Without
``source`` the statistics are 0 and 1 (the layer adds ``b'`` alone): equally exact, but the layer
then cannot be re-estimated.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bmc.contract import Contract
from bmc.errors import BmcError
from bmc.train.backbones import BN_EPSILON

# the Keras layer a folded convolution came from, as the converter names its filter tensor
_LAYER = re.compile(r"/((?:stem|top)_conv|block\d[a-z]_(?:expand_conv|dwconv|project_conv))(?:_\d+)?/")


class RecoverError(BmcError, ValueError):
    """A ``.tflite`` file that no Keras classifier can be recovered from; the message says why."""


def _bn_of(conv: str) -> str:
    if conv in ("stem_conv", "top_conv"):
        return conv.replace("_conv", "_bn")
    block, kind = conv.split("_", 1)
    return f"{block}_" + {"expand_conv": "expand_bn", "dwconv": "bn", "project_conv": "project_bn"}[kind]


def folded_weights(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """``{conv layer: (kernel in Keras layout, folded bias)}`` and the head's ``(kernel, bias)``,
    read from a float (float32 or float16-weight) ``.tflite`` file's flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    path = Path(path)
    try:
        model = fbu.read_model(str(path))
    except Exception as e:  # noqa: BLE001 - flatbuffers raises several kinds for a bad file
        raise RecoverError(f"{path}: not a readable .tflite file ({e})") from e
    sg = model.subgraphs[0]
    codes = [fbu.get_builtin_code_from_operator_code(oc) for oc in model.operatorCodes]
    op = schema.BuiltinOperator
    producer = {int(t): o for o in sg.operators for t in o.outputs}
    kinds = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16}

    def const(t: int) -> np.ndarray:
        o = producer.get(t)
        if o is not None and codes[o.opcodeIndex] == op.DEQUANTIZE:
            t = int(o.inputs[0])
        tensor = sg.tensors[t]
        if tensor.type not in kinds:
            raise RecoverError(f"{path}: weights are quantised (tensor type {tensor.type}); give the float16 file")
        data = model.buffers[tensor.buffer].data
        if data is None:
            raise RecoverError(f"{path}: tensor {tensor.name.decode()!r} is not a constant")
        return np.frombuffer(bytes(data), kinds[tensor.type]).reshape(tensor.shape).astype(np.float32)

    convs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    head = None
    for o in sg.operators:
        code = codes[o.opcodeIndex]
        if code in (op.CONV_2D, op.DEPTHWISE_CONV_2D):
            names = " ".join(sg.tensors[int(t)].name.decode() for t in list(o.inputs[1:]) + list(o.outputs))
            found = _LAYER.search(names)
            if found is None:
                raise RecoverError(f"{path}: a convolution with no Keras layer name ({names[:120]})")
            w, b = const(int(o.inputs[1])), const(int(o.inputs[2]))
            # CONV_2D (out, kh, kw, in) -> (kh, kw, in, out); DEPTHWISE (1, kh, kw, C) -> (kh, kw, C, 1)
            convs[found.group(1)] = (w.transpose(1, 2, 3, 0), b)
        elif code == op.FULLY_CONNECTED:
            head = (const(int(o.inputs[1])).T, const(int(o.inputs[2])))
    if head is None or not convs:
        raise RecoverError(f"{path}: no convolutions or no head found; not a bmc classifier")
    return convs, head


def recover(path: str | Path, contract: Contract, source: np.ndarray | None = None, batch: int = 32):
    """The Keras classifier of the float ``.tflite`` at ``path`` (see the module's docstring).
    ``source``: cells of the training laboratory, ``(n, size, size, 3)`` float RGB 0..255 as the
    model takes them, from which the BatchNormalization statistics are measured."""
    convs, (head_w, head_b) = folded_weights(path)
    model = _lite_like(convs, contract, path)
    dense = model.get_layer("cell_class")
    if tuple(dense.kernel.shape) != head_w.shape:
        raise RecoverError(f"{path}: its head has {head_w.shape[1]} classes, the contract {contract.num_classes}")
    dense.set_weights([head_w, head_b])
    for name, (kernel, _) in convs.items():
        model.get_layer(name).set_weights([kernel])
    for name, (_, bias) in convs.items():
        set_statistics(model.get_layer(_bn_of(name)), bias, np.zeros_like(bias), np.ones_like(bias))
    if source is not None:
        measure_source(model, convs, source, batch)
    return model


def _lite_like(convs: dict, contract, path):
    """The EfficientNet-Lite classifier (Lite0, 1 or 2) whose convolutions ``convs`` are."""
    import keras

    from bmc.train.backbones import LITE_BLOCKS, block_names
    from bmc.train.model import build_classifier

    def names(variant):
        out = {"stem_conv", "top_conv"}
        for k, b in enumerate(block_names(variant)):
            out |= {f"{b}_dwconv", f"{b}_project_conv"} | ({f"{b}_expand_conv"} if k else set())
        return out

    for variant in LITE_BLOCKS:
        if names(variant) != set(convs):
            continue
        model = build_classifier(variant, contract, weights=None)
        layers = {l.name: l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))}
        if all(tuple(layers[n].kernel.shape) == k.shape for n, (k, _) in convs.items()):
            return model
    lite0 = names("efficientnet_lite0")
    missing, extra = sorted(lite0 - set(convs)), sorted(set(convs) - lite0)
    raise RecoverError(
        f"{path}: not an EfficientNet-Lite0/1/2 classifier (against Lite0: missing {missing[:3]}, unexpected {extra[:3]})"
    )


def set_statistics(bn, bias: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    """Make ``bn`` the identity plus ``bias`` on data whose input has this ``mean`` and ``var``."""
    scale = np.sqrt(var + BN_EPSILON)
    slots = {"gamma": scale, "beta": bias + mean, "moving_mean": mean, "moving_variance": var}
    bn.set_weights([slots[v.path.split("/")[-1]].astype(np.float32) for v in bn.weights])


def measure_source(model, convs, images: np.ndarray, batch: int = 32) -> None:
    """Set every BatchNormalization to the statistics of its input on ``images`` (the training
    laboratory's cells). One pass serves all layers: on such cells each layer adds its bias
    whatever its statistics, so no layer's input depends on the statistics below it."""
    bns = [model.get_layer(_bn_of(name)) for name in convs]
    for bn, (mean, var), (_, bias) in zip(bns, input_statistics(model, bns, images, batch), convs.values()):
        set_statistics(bn, bias, mean, var)


def input_statistics(model, layers, images: np.ndarray, batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and variance of each layer's input over ``images`` (all pixels)."""
    import keras

    probe = keras.Model(model.input, [l.input for l in layers])
    sums: list[list] = [[0.0, 0.0, 0] for _ in layers]
    for i in range(0, len(images), batch):
        got = probe(images[i : i + batch], training=False)
        # a model of one output gives that tensor itself, not a list of one
        for acc, z in zip(sums, got if isinstance(got, (list, tuple)) else [got]):
            z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
            acc[0], acc[1], acc[2] = acc[0] + z.sum(0), acc[1] + (z * z).sum(0), acc[2] + len(z)
    out = []
    for total, sq, n in sums:
        mean = total / n
        out.append((mean.astype(np.float32), np.maximum(sq / n - mean * mean, 0.0).astype(np.float32)))
    return out

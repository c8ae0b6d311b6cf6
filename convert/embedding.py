"""The cell embedding as a second output of a ``.tflite`` classifier, and the guard set it carries.

A classifier ends ``… → global average pool → FULLY_CONNECTED → SOFTMAX``. The pooled vector (the
cell's *embedding*, 1280 numbers for EfficientNet-Lite0) is what a laboratory's adaptation learns
from (:mod:`bmc.edge_app.adapt`): a new linear head on it, fitted on the device from a few reviewed
cells. :func:`add_embedding_output` makes that tensor an output of the same graph, beside the
probabilities, by editing the flatbuffer's output list: no op is added or changed, so the
probabilities are bit for bit those of the original file and the invocation costs the same.

:func:`read_head` reads the final layer's weights back (dequantized) and :func:`build_guard` embeds
a few hundred training cells per class: the *guard set* that an adapted head is fitted with, so
that it keeps every class the laboratory did not review, and is checked against for forgetting.

Uses LiteRT's own flatbuffer schema (``ai_edge_litert``): no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.edge_app.adapt import GUARD_SUFFIX
from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS, EMBEDDING, PROBABILITIES
from bmc.errors import BmcError


class EmbeddingError(BmcError, ValueError):
    """A model whose embedding cannot be exposed or read; the message names the file."""


def _schema():
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    return schema, fbu


def _head_op(model, where: str):
    """The FULLY_CONNECTED op that makes the class scores, found by walking back from output 0."""
    schema, fbu = _schema()
    sg = model.subgraphs[0]
    codes = [fbu.get_builtin_code_from_operator_code(oc) for oc in model.operatorCodes]
    producer = {int(t): op for op in sg.operators for t in op.outputs}
    t = int(sg.outputs[0])
    for _ in range(6):  # QUANTIZE ← SOFTMAX ← FULLY_CONNECTED, with room for a RESHAPE or two
        op = producer.get(t)
        if op is None:
            break
        if codes[op.opcodeIndex] == schema.BuiltinOperator.FULLY_CONNECTED:
            return op, producer, codes
        t = int(op.inputs[0])
    raise EmbeddingError(f"{where}: no FULLY_CONNECTED layer feeds the class scores; not a bmc classifier")


def add_embedding_output(data: bytes, where: str = "model") -> bytes:
    """The ``.tflite`` bytes with the head's input (the pooled embedding) as output 1."""
    schema, fbu = _schema()
    model = fbu.read_model_from_bytearray(bytearray(data))
    sg = model.subgraphs[0]
    op, _, _ = _head_op(model, where)
    emb = int(op.inputs[0])
    outputs = [int(t) for t in sg.outputs]
    if len(outputs) > 1:
        if outputs[1] == emb:
            return bytes(data)  # already has it
        raise EmbeddingError(f"{where}: has {len(outputs)} outputs; expected the class scores alone")
    sg.outputs = np.array(outputs + [emb], dtype=np.int32)
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            m = schema.TensorMapT()
            m.name, m.tensorIndex = EMBEDDING, emb
            sig.outputs = list(sig.outputs or []) + [m]
    return bytes(fbu.convert_object_to_bytearray(model))


def _constant(model, producer, codes, t: int) -> np.ndarray:
    """A constant tensor's values as float32 (dequantized, or through a DEQUANTIZE of float16)."""
    schema, _ = _schema()
    sg = model.subgraphs[0]
    op = producer.get(t)
    if op is not None and codes[op.opcodeIndex] == schema.BuiltinOperator.DEQUANTIZE:
        return _constant(model, producer, codes, int(op.inputs[0]))
    tensor = sg.tensors[t]
    raw = model.buffers[tensor.buffer].data
    if raw is None or len(raw) == 0:
        raise EmbeddingError("the head's weights are not constants of the model")
    dtypes = {
        schema.TensorType.FLOAT32: np.float32,
        schema.TensorType.FLOAT16: np.float16,
        schema.TensorType.INT8: np.int8,
        schema.TensorType.INT32: np.int32,
    }
    values = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), dtypes[tensor.type]).reshape(tensor.shape)
    q = tensor.quantization
    if q is not None and q.scale is not None and len(q.scale):
        scale = np.asarray(q.scale, np.float32)
        zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0], np.float32)
        if len(scale) > 1:  # per channel, along the quantized dimension
            shape = [1] * values.ndim
            shape[q.quantizedDimension] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (values.astype(np.float32) - zero) * scale
    return values.astype(np.float32)


def read_head(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The final layer of the classifier at ``path``: ``W`` (embedding x classes) and ``b``
    (classes), float32, such that the scores are ``softmax(embedding @ W + b)``."""
    if str(path).endswith(".onnx"):
        from bmc.convert.onnx_head import read_head as onnx_head

        return onnx_head(path)
    schema, fbu = _schema()
    model = fbu.read_model(str(path))
    op, producer, codes = _head_op(model, str(path))
    w = _constant(model, producer, codes, int(op.inputs[1]))  # (classes, embedding)
    sg = model.subgraphs[0]
    bias_t = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    if bias_t < 0:
        b = np.zeros(len(w), np.float32)
    else:
        b = _constant(model, producer, codes, bias_t).reshape(-1)
        bias = sg.tensors[bias_t]
        if bias.type == schema.TensorType.INT32 and (bias.quantization is None or not len(bias.quantization.scale)):
            raise EmbeddingError(f"{path}: the head's bias has no scale")
    return np.ascontiguousarray(w.T, np.float32), b.astype(np.float32)


def expose(model_path: str | Path) -> bool:
    """Rewrite ``model_path`` (and its card's sha256, size and outputs) so that it gives the
    embedding too; False when it already did. The class scores are unchanged."""
    from bmc.card import read_card, sha256_file, update_card

    model_path = Path(model_path)
    data = model_path.read_bytes()
    new = add_embedding_output(data, str(model_path))
    card = read_card(model_path)
    if new == data and card.get("outputs"):
        return False
    tmp = model_path.with_suffix(".tflite.tmp")
    tmp.write_bytes(new)
    tmp.replace(model_path)
    w, _ = read_head(model_path)
    update_card(
        model_path,
        sha256=sha256_file(model_path),
        size_bytes=model_path.stat().st_size,
        outputs=[PROBABILITIES, EMBEDDING],
        embedding={"size": int(w.shape[0]), "pooled": "global average"},
    )
    return True


def build_guard(
    model_path: str | Path,
    samples,
    per_class: int = 200,
    orientations: int = DEFAULT_ORIENTATIONS,
    seed: int = 0,
    threads: int | None = None,
    log=print,
) -> Path:
    """Embed ``per_class`` training cells of each class (``samples``: ``bmc.train.data.Sample`` s, the
    training part of the model's split) in ``orientations`` orientations, averaged as on the device,
    and write them beside the model (``<model>.guard.npz``), recorded in its card.

    Stored as uint8 on a common scale (the embedding is a mean of ReLU6 activations, >= 0), with
    the shipped head's weights, so that adaptation on the device needs nothing else."""
    from bmc.card import sha256_file, update_card
    from bmc.contract import preprocess, read_image
    from bmc.edge_app.classifier import CellClassifier

    clf = CellClassifier(model_path, threads=threads, orientations=orientations, require_deployable=False)
    if not clf.has_embedding:
        raise EmbeddingError(f"{model_path}: gives no embedding; expose it first")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    missing = [l for l in clf.base_labels if l not in by_class]
    if missing:
        raise EmbeddingError(f"no training images of {', '.join(missing)} for the guard set")
    embs, ys, names = [], [], []
    for k, label in enumerate(clf.base_labels):
        pool = sorted(by_class[label], key=lambda s: str(s.path))
        pick = [pool[i] for i in sorted(rng.choice(len(pool), min(per_class, len(pool)), replace=False))]
        for i in range(0, len(pick), 16):
            batch = np.stack(
                [preprocess(read_image(str(s.path)), clf.contract, "BGR", crop=True) for s in pick[i : i + 16]]
            )
            embs.append(clf.predict_cells(batch)[1])
        ys += [k] * len(pick)
        names += [Path(s.path).name for s in pick]
        log(f"guard set: {label} {len(pick)} cells")
    x = np.concatenate(embs).astype(np.float32)
    scale = float(x.max()) / 255 or 1.0
    w, b = read_head(model_path)
    out = Path(str(Path(model_path).with_suffix("")) + GUARD_SUFFIX)
    np.savez_compressed(
        out,
        embedding=np.clip(np.round(x / scale), 0, 255).astype(np.uint8),
        scale=np.float32(scale),
        label=np.asarray(ys, np.int16),
        labels=np.asarray(clf.base_labels),
        files=np.asarray(names),
        head_w=w,
        head_b=b,
        orientations=np.int16(orientations),
    )
    update_card(
        model_path,
        guard={
            "file": out.name,
            "sha256": sha256_file(out),
            "cells": len(ys),
            "per_class": per_class,
            "orientations": orientations,
            "from": "training part of the model's split",
            "model_sha256": sha256_file(model_path),
        },
    )
    return out


def calibrate_unknown(
    model_path: str | Path, samples, orientations: int = DEFAULT_ORIENTATIONS, threads: int | None = None, log=print
) -> dict:
    """Calibrate the unknown-cell check (``edge_app/unknown.py``) on ``samples``, the validation part
    of the model's split: each cell's distance to the nearest guard-set cell, summarised as the
    card's ``unknown`` quantiles. Needs the guard set (:func:`build_guard`) first."""
    from bmc.card import update_card
    from bmc.contract import preprocess, read_image
    from bmc.edge_app import unknown
    from bmc.edge_app.classifier import CellClassifier

    clf = CellClassifier(model_path, threads=threads, orientations=orientations, require_deployable=False)
    guard = clf.card.get("guard")
    if not clf.has_embedding or not guard:
        raise EmbeddingError(f"{model_path}: needs its embedding output and guard set first (bmc prepare-adapt)")
    reference = unknown.reference_of(model_path, clf.card)
    scores = []
    for i in range(0, len(samples), 16):
        batch = np.stack(
            [preprocess(read_image(str(s.path)), clf.contract, "BGR", crop=True) for s in samples[i : i + 16]]
        )
        scores.append(unknown.distances(clf.predict_cells(batch)[1], reference))
    s = np.concatenate(scores)
    calib = unknown.calibration(
        s, len(reference), f"validation part of the model's split ({len(s)} cells, {orientations} orientations)"
    )
    update_card(model_path, unknown=calib)
    log(
        f"unknown-cell check: {len(s)} validation cells; threshold at level {unknown.DEFAULT_LEVEL}: "
        f"{unknown.threshold_at(calib, unknown.DEFAULT_LEVEL):.4f}"
    )
    return calib

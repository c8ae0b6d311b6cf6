"""``bmc convert --onnx``: the float model as ONNX files for ONNX Runtime, each held to the same
gate as the TFLite variants.

* ``<name>_fp32.onnx``: Keras 3's own exporter (``model.export(format="onnx")``), float32, with
  the class scores and the cell's pooled embedding as its two outputs, as the ``.tflite`` files;
* ``<name>_int8.onnx``: ONNX Runtime's static quantiser (QDQ, per-channel int8 weights, uint8
  activations), calibrated on the same training images as the TFLite int8 file
  (:func:`bmc.convert.build.representative_images`). Fully integer, EfficientNet's first
  convolutions lose the most (as in the TFLite file, whose debugger names the stem and block1a): the
  int8 file keeps the fewest leading convolutions in float (0, 2, 4 or 6, :data:`FLOAT_PREFIXES`)
  that pass the gate on the *validation* split, and only then is it scored on the test split.

Each file is scored against the Keras float model on the held-out test split, with the same
:class:`bmc.convert.gate.Gate`, and gets the same model card (contract, outputs, validation), the
guard set and the unknown-cell calibration, so that adaptation, unknown cells and maps work on it
unchanged (:mod:`bmc.edge_app.backends.onnxrt` runs it).
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import numpy as np

from bmc import __version__
from bmc.card import sha256_file, write_card
from bmc.convert.gate import Gate
from bmc.convert.onnx_head import read_head
from bmc.convert.variants import Variant
from bmc.edge_app.classifier import EMBEDDING, PROBABILITIES
from bmc.errors import BmcError

# named apart from the .tflite files beside them: a card is the file's name with .json, and the edge
# install's package data takes every ``*_int8.json`` (the ONNX files stay out of it)
VARIANTS = {
    "float32": Variant("float32", "_onnx-fp32.onnx", "onnx-fp32", "ONNX, float32 weights and activations"),
    "int8": Variant(
        "int8", "_onnx-int8.onnx", "onnx-int8", "ONNX, static int8 (QDQ: per-channel int8 weights, uint8 activations)"
    ),
}


class OnnxError(BmcError, RuntimeError):
    """An ONNX export or quantisation that cannot be done; the message says why."""


def _need():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise OnnxError(f"ONNX export needs the onnx extra: pip install '.[train]' from the bmc checkout ({e})") from e
    return onnx, onnxruntime


def export_float(model, path: Path) -> Path:
    """The Keras classifier ``model`` as a float32 ONNX file with outputs (probabilities, embedding)."""
    import keras

    onnx, _ = _need()
    two = keras.Model(model.input, [model.output, model.get_layer("avg_pool").output], name="bmc_onnx")
    two.predict(np.zeros((1, *model.input.shape[1:]), np.float32), verbose=0)  # the exporter needs a called model
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        two.export(str(raw), format="onnx", verbose=False)
        graph = onnx.load(str(raw))
    # outputs named as the cards name them, in the same order
    for out, name in zip(graph.graph.output, (PROBABILITIES, EMBEDDING)):
        old = out.name
        for node in graph.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        out.name = name
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


# how many of the network's leading convolutions the int8 file may keep in float, tried in order
FLOAT_PREFIXES = (0, 2, 4, 6)


def leading_nodes(graph, convs: int) -> list[str]:
    """The names of the nodes before the ``convs + 1``-th convolution of ``graph`` (none for 0):
    the first ``convs`` convolutions with what feeds and follows them (scaling, batch norm, ReLU6)."""
    if convs <= 0:
        return []
    names, seen = [], 0
    for node in graph.node:
        if node.op_type == "Conv":
            if seen == convs:
                break
            seen += 1
        names.append(node.name)
    return names


def quantize_int8(float_path: Path, path: Path, representative: np.ndarray, float_convs: int = 0) -> Path:
    """Static int8 quantisation (QDQ) of ``float_path``, calibrated on ``representative`` (N x H x
    W x 3 float RGB 0..255, the model's own input), its first ``float_convs`` convolutions kept in
    float."""
    onnx, _ = _need()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter(
                [{name: representative[i : i + 1].astype(np.float32)} for i in range(len(representative))]
            )

        def get_next(self):
            return next(self.batches, None)

    import onnxruntime as ort

    name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(
            str(float_path), str(prepared), skip_symbolic_shape=True
        )  # static shapes: ONNX inference suffices
        quantize_static(
            str(prepared),
            str(path),
            Reader(name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=leading_nodes(onnx.load(str(float_path)).graph, float_convs),
        )
    return path


def convert_onnx(
    model,
    contract,
    source_file: Path,
    train,
    test,
    out_dir: Path,
    name: str,
    gate: Gate = Gate(),
    n_representative: int = 200,
    val=None,
    float_prefixes: tuple[int, ...] = FLOAT_PREFIXES,
    log=print,
) -> list[dict]:
    """Both ONNX variants of the Keras ``model`` in ``out_dir``, each scored against it on ``test``
    (``bmc.train.data.Sample`` s), with its card; the rows of the conversion report. With ``val``,
    the int8 file keeps the fewest leading convolutions in float of ``float_prefixes`` that pass the
    gate there (one prefix: that one, scored there all the same)."""
    from bmc.convert.build import batched, compare, load_test, representative_images
    from bmc.edge_app.backends.onnxrt import OnnxRuntimeBackend
    from bmc.train.metrics import classification_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(contract.labels)
    xs, y = load_test(test, contract)
    float_probs = batched(lambda b: model.predict(b, verbose=0), xs)
    float_metrics = classification_metrics(y, float_probs, labels)
    log(f"keras float on {len(y)} test images: accuracy {float_metrics.accuracy:.4f}")
    fp32 = export_float(model, out_dir / f"{name}{VARIANTS['float32'].suffix}")
    log(f"exported {fp32.name}; calibrating int8 on {n_representative} training images …")
    reps = representative_images(train, contract, n_representative)
    int8 = out_dir / f"{name}{VARIANTS['int8'].suffix}"
    float_convs = 0
    if val:
        vx, vy = load_test(val, contract)
        v_float = batched(lambda b: model.predict(b, verbose=0), vx)
        for float_convs in float_prefixes:
            quantize_int8(fp32, int8, reps, float_convs)
            on_val = compare(v_float, batched(OnnxRuntimeBackend(str(int8)).predict, vx), vy, labels, gate)
            log(
                f"int8, first {float_convs} convolutions in float: on {len(vy)} validation images agreement "
                f"{on_val['agreement']:.4f}, worst class {on_val['worst_class']} "
                f"({-on_val['class_recall_drop_points'][on_val['worst_class']]:+.1f}), "
                f"{'PASS' if on_val['passed'] else 'FAIL'}"
            )
            if on_val["passed"]:
                break
        else:
            log(f"int8: no prefix passed on the validation images; the file keeps {float_convs} in float")
    else:
        float_convs = float_prefixes[0]
        quantize_int8(fp32, int8, reps, float_convs)
    rows = []
    for v, path in ((VARIANTS["float32"], fp32), (VARIANTS["int8"], int8)):
        probs = batched(OnnxRuntimeBackend(str(path)).predict, xs)
        row = {"variant": f"onnx-{v.name}", "format": v.format, "file": path.name, "size_mb": path.stat().st_size / 1e6}
        if v.name == "int8":
            row["float_convolutions"] = float_convs
        row.update(compare(float_probs, probs, y, labels, gate))
        log(
            f"{path.name}: {row['size_mb']:.2f} MB, accuracy {row['accuracy']:.4f} (drop "
            f"{row['accuracy_drop_points']:+.2f}), agreement {row['agreement']:.4f}, {'PASS' if row['passed'] else 'FAIL'}"
        )
        _card(path, v, row, contract, source_file, float_metrics, gate)
        rows.append({k: val for k, val in row.items() if k != "metrics"})
    return rows


def _card(path: Path, v: Variant, row: dict, contract, source_file: Path, float_metrics, gate: Gate) -> None:
    from bmc.convert.build import validation_section

    description = v.description
    if row.get("float_convolutions"):
        description += f"; its first {row['float_convolutions']} convolutions in float"
    write_card(
        path,
        {
            "name": path.stem,
            "variant": f"onnx-{v.name}",
            "format": v.format,
            "runtime": "onnxruntime",
            "description": description,
            "int8_only": False,
            "bmc_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "contract": contract.to_dict(),
            "outputs": [PROBABILITIES, EMBEDDING],
            "embedding": {"size": int(read_head(path)[0].shape[0]), "pooled": "global average"},
            "source_model": {"file": source_file.name, "sha256": sha256_file(source_file)},
            "validation": validation_section(row, gate, float_metrics, "held-out test split of the model's split"),
            "deployable": row["passed"],
        },
    )


def mark_not_deployable(path: Path, why: str) -> None:
    """Mark ``path``'s card not deployable, saying why (the edge app then refuses it)."""
    from bmc.card import update_card

    update_card(path, deployable=False, not_deployable_because=why)


def report_markdown(rows: list[dict], float_accuracy: float | None = None) -> str:
    lines = [
        "| variant | file | size (MB) | accuracy | agreement | drop (pts) | worst class | gate |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['file']} | {r['size_mb']:.2f} | {r['accuracy']:.4f} | {r['agreement']:.4f} | "
            f"{r['accuracy_drop_points']:+.2f} | {r['worst_class']} ({0.0 - r['class_recall_drop_points'][r['worst_class']] + 0.0:+.1f}) | "
            f"{'PASS' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: Path, name: str) -> Path:
    (out_dir / f"{name}_onnx_conversion.json").write_text(json.dumps(rows, indent=2))
    path = out_dir / f"{name}_onnx_conversion.md"
    path.write_text(report_markdown(rows))
    return path

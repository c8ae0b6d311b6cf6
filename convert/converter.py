"""Keras 3 model → TFLite bytes, through a SavedModel export.

``TFLiteConverter.from_keras_model`` is unreliable with Keras 3 models on TensorFlow 2.21, so the
model is exported with ``model.export(..., format="tf_saved_model")`` and converted from there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bmc.convert.variants import Quantization
from bmc.errors import BmcError


class ConversionError(BmcError, RuntimeError):
    pass


def export_saved_model(model, path: Path) -> Path:
    model.export(str(path), format="tf_saved_model", verbose=False)
    return path


def _converter(saved_model: Path, q: Quantization):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    name = q.variant.name
    if name == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif name == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif name == "int8":
        if q.representative is None:
            raise ConversionError("int8 needs representative images")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = q.representative
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
        if q.float_layers:
            # float fallback for the listed layers: int8 builtins plus float builtins
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv


def to_tflite(model, q: Quantization, workdir: Path | None = None) -> bytes:
    """Convert a Keras model for one variant; returns the ``.tflite`` file's bytes."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        sm = export_saved_model(model, Path(tmp) / "saved_model")
        conv = _converter(sm, q)
        if q.float_layers:
            return _selective(conv, q)
        try:
            return conv.convert()
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            raise ConversionError(f"{q.variant.name}: TFLite conversion failed: {e}") from e


def _selective(conv, q: Quantization) -> bytes:
    """int8 with ``q.float_layers`` left in float, through TensorFlow's quantization debugger."""
    import tensorflow as tf

    opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(q.float_layers))
    dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=q.representative, debug_options=opts)
    return dbg.get_nondebug_quantized_model()


def quantization_error_by_layer(model, q: Quantization, debug_images, top: int = 10) -> list[dict]:
    """Per-layer int8 error (TensorFlow's quantization debugger), worst first.

    ``rmse/scale`` is the root-mean-square error of a layer's quantized output over its
    quantization step: about 0.29 (1/sqrt(12)) for a layer that only suffers rounding, far more
    for one whose range is badly calibrated (squeeze-excite, swish tails).
    """
    import numpy as np
    import tensorflow as tf

    def gen():
        for x in debug_images:
            yield [np.asarray(x, np.float32)[None]]

    with tempfile.TemporaryDirectory() as tmp:
        conv = _converter(export_saved_model(model, Path(tmp) / "sm"), q)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=gen)
        dbg.run()
        import csv
        import io

        buf = io.StringIO()
        dbg.layer_statistics_dump(buf)  # the dump carries each tensor's scale and zero point
        buf.seek(0)
        rows = []
        for r in csv.DictReader(buf):
            scale = float(r.get("scale") or 0.0)
            rmse = float(np.sqrt(float(r.get("mean_squared_error") or 0.0)))
            rows.append(
                {
                    "tensor": r["tensor_name"],
                    "op": r.get("op_name", ""),
                    "rmse": rmse,
                    "scale": scale,
                    "rmse_over_scale": rmse / scale if scale else 0.0,
                }
            )
    rows.sort(key=lambda r: -r["rmse_over_scale"])
    return rows[:top]

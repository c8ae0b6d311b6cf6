"""The TensorFlow input pipeline for evaluation-time preprocessing, graph-native.

The same contract as :func:`bmc.contract.preprocess`, expressed in TensorFlow ops so that a
``tf.data`` pipeline can run on an accelerator host without Python in the loop. The parity test
(``tests/test_contract.py``) holds it to the numpy/OpenCV path within one grey level.
"""

from __future__ import annotations

from bmc.contract import Contract


def tf_preprocess_file(path, contract: Contract):
    """A path tensor → the model input (float32, RGB, 0..255, ``input_size``²)."""
    import tensorflow as tf

    raw = tf.io.read_file(path)
    # INTEGER_ACCURATE matches libjpeg's default islow IDCT, which OpenCV uses
    img = tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    side = tf.maximum(1, tf.cast(tf.round(tf.cast(tf.minimum(h, w), tf.float64) * contract.crop_fraction), tf.int32))
    top = (h - side) // 2
    left = (w - side) // 2
    img = img[top : top + side, left : left + side]
    size = contract.input_size
    method = {"area": "area", "linear": "bilinear"}[contract.interpolation]
    out = tf.clip_by_value(tf.round(tf.image.resize(tf.cast(img, tf.float32), (size, size), method=method)), 0.0, 255.0)
    if contract.stain_norm == "stretch":
        out = _tf_stretch(out)
    return out


def _tf_stretch(rgb):
    """:func:`bmc.contract.normalise_stain` ``"stretch"`` in TensorFlow ops (same integer luma)."""
    import tensorflow as tf

    from bmc.contract import STRETCH_MIN_SPAN, STRETCH_PERCENTILES

    q = tf.cast(rgb, tf.int32)
    luma = (q[..., 0] * 4899 + q[..., 1] * 9617 + q[..., 2] * 1868 + 8192) // 16384
    cum = tf.cast(tf.cumsum(tf.math.bincount(tf.reshape(luma, [-1]), minlength=256, maxlength=256)), tf.float64)
    n = cum[-1]
    lo = tf.searchsorted(cum, [STRETCH_PERCENTILES[0] * n])[0]
    hi = tf.searchsorted(cum, [STRETCH_PERCENTILES[1] * n])[0]
    span = STRETCH_MIN_SPAN
    mid = tf.cast(lo + hi, tf.float64) / 2
    narrow_lo = tf.cast(tf.floor(tf.maximum(0.0, tf.minimum(mid - span / 2, 255.0 - span))), tf.int32)
    narrow = hi - lo < span
    lo = tf.where(narrow, narrow_lo, tf.cast(lo, tf.int32))
    hi = tf.where(narrow, narrow_lo + span, tf.cast(hi, tf.int32))
    gain = tf.cast(255.0 / tf.cast(hi - lo, tf.float64), tf.float32)
    return tf.clip_by_value(tf.round((rgb - tf.cast(lo, tf.float32)) * gain), 0.0, 255.0)

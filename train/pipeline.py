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
    img = img[top:top + side, left:left + side]
    size = contract.input_size
    method = {"area": "area", "linear": "bilinear"}[contract.interpolation]
    out = tf.image.resize(tf.cast(img, tf.float32), (size, size), method=method)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)

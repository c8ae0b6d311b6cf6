"""The cell classifier: a pretrained backbone, dropout and a softmax head.

The model is one flat Keras functional graph (no nested sub-models) with
``keras.applications``-style layer names, so that it can be cut at any block for the CPU path
(:func:`split_at`) and converted to TFLite as is.
"""

from __future__ import annotations

from bmc.contract import Contract
from bmc.train.backbones import BackboneError, build_backbone, model_block_names


def build_classifier(backbone: str, contract: Contract, weights: str | None = "imagenet", dropout: float = 0.3):
    import keras

    base = build_backbone(backbone, contract.input_size, weights)
    x = keras.layers.Dropout(dropout, name="head_dropout")(base.output)
    # float32 softmax under a mixed-precision policy
    out = keras.layers.Dense(contract.num_classes, activation="softmax", dtype="float32", name="cell_class")(x)
    return keras.Model(base.input, out, name=f"bmc_{backbone}")


def backbone_layers(model):
    """Every layer of the backbone (all but the head)."""
    return [l for l in model.layers if l.name not in ("head_dropout", "cell_class")]


def split_at(model, block: str):
    """Cut ``model`` at the input of ``block`` (e.g. ``"block6a"``).

    Returns ``(bottom, top, top_features)`` models sharing the weights of ``model``:
    ``top_features`` ends at the pooled backbone features, before the head.
    """
    names = model_block_names(model)
    if block not in names:
        raise BackboneError(f"unknown block {block!r}; choose one of {', '.join(names)}")
    first = next(l for l in model.layers if l.name.startswith(f"{block}_"))  # the block's first layer
    cut = first.input
    import keras

    return (
        keras.Model(model.input, cut, name="bottom"),
        keras.Model(cut, model.output, name="top"),
        keras.Model(cut, model.get_layer("avg_pool").output, name="top_features"),
    )


def set_trainable_from(model, block: str | None) -> None:
    """Freeze the backbone below ``block`` (None: freeze it all). BatchNorm stays frozen.

    Fine-tuning with frozen BatchNorm statistics is the standard recipe for EfficientNet
    transfer learning on small data sets: batch statistics of a few dozen cells are noisy.
    """
    import keras

    names = model_block_names(model)
    if block is not None and block not in names:
        raise BackboneError(f"unknown block {block!r}; choose one of {', '.join(names)}")
    trainable_prefixes = () if block is None else tuple(f"{n}_" for n in names[names.index(block) :]) + ("top_",)
    for layer in backbone_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        else:
            layer.trainable = bool(trainable_prefixes) and layer.name.startswith(trainable_prefixes)

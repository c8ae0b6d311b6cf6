"""Batch-normalisation statistics re-estimated on another microscope's cells (AdaBN).

A network trained at one laboratory normalises every layer with that laboratory's statistics. At
another microscope (another lamp, stain, camera and optics) the same layers see inputs of another
mean and spread, and every later layer sees them shifted. AdaBN (Li et al., "Adaptive batch
normalization for practical domain adaptation", Pattern Recognition 2018) re-estimates each
BatchNormalization's mean and variance on the new microscope's cells, with no label; Tsutsui et al.
(ICASSP 2023) found it decisive for blood cells across microscopes. The learnt weights, the head
and the scale γ, β are kept: only what the layers take as "ordinary" changes.

The statistics are re-estimated from the bottom up, each layer on the inputs the layers below it,
already re-estimated, give: what the network would compute on that microscope with every layer
normalised there. Cells should be ordinary cells of the laboratory's smears, as a session records
them: a sample dominated by abnormal cells would make those the norm.
"""

from __future__ import annotations

import numpy as np

from bmc.train.recover import input_statistics


def batchnorm_layers(model) -> list:
    import keras

    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def adapt_batchnorm(
    model, images: np.ndarray, batch: int = 32, first: str | None = None, weight: float = 1.0, log=None
) -> int:
    """Re-estimate every BatchNormalization's moving mean and variance on ``images`` (the target
    microscope's cells as the model takes them), bottom to top, in place; returns the layers done.

    One probe model per layer; each runs the network up to that layer's input with the layers below
    already set, so the estimate is sequential, as AdaBN defines it. ``first``: the lowest layer
    re-estimated (a block name such as ``"block6a"``, or ``"top"``; None: all); ``weight``: the
    share of the new statistics in the ones kept (1: AdaBN's own)."""
    layers = batchnorm_layers(model)
    if first is not None:
        start = next((i for i, l in enumerate(layers) if l.name.startswith(first)), None)
        if start is None:
            raise ValueError(f"no BatchNormalization layer starts with {first!r}")
        layers = layers[start:]
    for i, bn in enumerate(layers):
        [(mean, var)] = input_statistics(model, [bn], images, batch)
        old = {v.path.split("/")[-1]: w for v, w in zip(bn.weights, bn.get_weights())}
        # the variances blend as the second moments about the blended mean do
        m = weight * mean + (1 - weight) * old["moving_mean"]
        v2 = weight * (var + (mean - m) ** 2) + (1 - weight) * (old["moving_variance"] + (old["moving_mean"] - m) ** 2)
        slots = {"moving_mean": m, "moving_variance": v2}
        bn.set_weights([slots.get(v.path.split("/")[-1], w) for v, w in zip(bn.weights, bn.get_weights())])
        if log is not None and (i + 1) % 10 == 0:
            log(f"AdaBN: {i + 1} of {len(layers)} layers re-estimated")
    return len(layers)

"""Measuring the cell scale of a training set: how much of the model's crop a cell spans.

The edge app finds cells with :func:`bmc.edge_app.detect.find_cells` and cuts them so that they reach
the model at the scale it learnt. The same finder is run here on training images, so "cell
diameter" means the same thing on both sides: the contract's ``cell_fraction`` is the median,
over training images where the finder sees a cell near the centre, of that cell's box diameter
over the side of the contract's centre crop.
"""

from __future__ import annotations

import numpy as np

from bmc.contract import read_image
from bmc.edge_app.detect import find_cells
from bmc.errors import BmcError


class CellScaleError(BmcError, ValueError):
    """The training images' cell scale or lamp cannot be measured; the message says why."""


def _sampled_images(samples, n: int, seed: int):
    """The readable ones among ``min(n, len(samples))`` random training images, decoded (BGR)."""
    for i in np.random.default_rng(seed).choice(len(samples), size=min(n, len(samples)), replace=False):
        try:
            yield read_image(samples[i].path)
        except ValueError:
            continue


def measure_cell_fraction(samples, crop_fraction: float, n: int = 400, seed: int = 0) -> tuple[float, int]:
    """(median cell fraction, number of images it was measured on)."""
    picked = min(n, len(samples))
    fractions = []
    for img in _sampled_images(samples, n, seed):
        h, w = img.shape[:2]
        side = crop_fraction * min(h, w)
        cells = [
            c for c in find_cells(img) if abs(c.centre[0] - w / 2) < side / 3 and abs(c.centre[1] - h / 2) < side / 3
        ]
        if cells:
            c = min(cells, key=lambda c: (c.centre[0] - w / 2) ** 2 + (c.centre[1] - h / 2) ** 2)
            fractions.append(c.box.diameter / side)
    if len(fractions) < max(5, picked // 10):
        raise CellScaleError(
            f"could not measure the cell scale: the cell finder saw a centred cell in only "
            f"{len(fractions)} of {picked} training images (are these single-cell crops?)"
        )
    return float(np.clip(np.median(fractions), 0.05, 1.0)), len(fractions)


def measure_lamp(samples, n: int = 400, seed: int = 0) -> tuple[float, float, float]:
    """The training images' background colour (RGB): the median over ``n`` of them of
    :func:`bmc.contract.lamp_of`. The device white-balances each session onto it."""
    from bmc.contract import lamp_of

    lamps = [lamp_of(img)[::-1] for img in _sampled_images(samples, n, seed)]  # BGR → RGB
    if not lamps:
        raise CellScaleError("could not measure the lamp colour: no readable training image")
    return tuple(round(float(v), 1) for v in np.median(lamps, axis=0))

"""A diagnostic: label-free stain calibration of a session onto the training stain, at test time.

A microscope's fields say what its stain looks like without any label: the background (lamp and
white balance), the mean optical density of the nuclear stain (the cell finder's mask) and of the
red cells. Pooled over a session's fields and over the training images, they give a linear map of
optical densities that takes the session's stain onto the training one:

* ``white`` — background only: each channel divided by the session's background and multiplied by
  the training images' (a white balance onto the CellaVision lamp);
* ``stains`` — and the nuclear and red-cell colours mapped onto the training ones (the third
  direction, their cross product, onto its counterpart).

Measured on BCCD (``bmc bench generalisation MODEL --calibrate white|stains``) and reported in
``benchmarks/README.md``: not built into the edge app, because mapping BCCD's red cells onto
CellaVision's pale pink also erases the eosinophils' granules, which share their colour there.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np

from bmc.contract import lamp_of, read_image
from bmc.edge_app.detect import FinderConfig, stain_mask

CALIBRATIONS = ("none", "white", "stains")


def stain_stats(bgr: np.ndarray):
    """(background RGB, mean nuclear OD, mean red-cell OD) of one field or cell image."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(-1, 3).astype(np.float32)
    background = lamp_of(bgr, step=1)[::-1] + 1.0
    od = -np.log((rgb + 1.0) / background)
    nucleus = stain_mask(bgr, FinderConfig()).ravel() > 0
    a = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 1].ravel().astype(np.float32)
    red = ~nucleus & (a > np.percentile(a, 60)) & (od.sum(1) > 0.3)
    nan = np.full(3, np.nan, np.float32)
    return background, od[nucleus].mean(0) if nucleus.any() else nan, od[red].mean(0) if red.any() else nan


def pooled_stats(paths):
    stats = [stain_stats(read_image(str(p))) for p in paths]
    return tuple(np.nanmedian([s[k] for s in stats], axis=0) for k in range(3))


def reference_stats(data: str | Path, n: int = 150, seed: int = 0):
    """The training stain: pooled over ``n`` random images of a class-folder data set."""
    files = sorted(Path(data).glob("*/*.jpg"))
    if not files:
        raise ValueError(f"{data}: no class-folder images (*/*.jpg) to take the reference stain from")
    return pooled_stats(random.Random(seed).sample(files, min(n, len(files))))


def calibrator(session, reference, how: str):
    """RGB uint8 → RGB uint8: the session's stain mapped onto the reference's."""
    if how not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {how!r}")
    if how == "none":
        return lambda rgb: rgb
    mix = np.eye(3, dtype=np.float32)
    if how == "stains":

        def basis(n, r):
            c = np.cross(n, r)
            return np.stack([n, r, c / np.linalg.norm(c)], 1)

        mix = (basis(reference[1], reference[2]) @ np.linalg.inv(basis(session[1], session[2]))).astype(np.float32)

    def apply(rgb):
        od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1.0) / session[0])
        out = reference[0] * np.exp(-(od @ mix.T)) - 1.0
        return np.clip(out, 0, 255).astype(np.uint8).reshape(rgb.shape)

    return apply

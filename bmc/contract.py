"""The preprocessing contract shared by training, conversion, evaluation and the edge app.

Pure numpy + OpenCV so that the device can import it without TensorFlow. A model is only ever fed
through :func:`preprocess`, with the :class:`Contract` that travels with the model (run folder,
model card, TFLite metadata); nothing downstream guesses a size, a colour order or a scale.

Conventions (schema version 1):

* The model input is ``input_size x input_size x 3`` RGB, float32 in 0..255 (or uint8 for a
  full-integer model). Normalisation to the backbone's range is a layer *inside* the model, so
  that int8 models take raw pixels with scale 1 and the edge app cannot apply it twice.
* Colour conversion happens here and only here, driven by the pixel format that the frame source
  declares (``"BGR"`` for OpenCV captures and ``cv2.imread``, ``"RGB"`` for Picamera2 / PIL).
* ``crop_fraction`` is the side of the centred square crop taken from a training image, as a
  fraction of its shorter side, before resizing. ``cell_fraction`` is how much of that crop a
  typical nucleated cell spans (its diameter / crop side): the edge app cuts a detected cell with
  side ``diameter / cell_fraction`` so that cells reach the model at the scale it learnt.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import cv2
import numpy as np

from bmc.errors import BmcError

SCHEMA_VERSION = 1
PIXEL_FORMATS = ("BGR", "RGB", "GRAY")
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}
STAIN_NORMS = ("none", "stretch")
STRETCH_PERCENTILES = (0.01, 0.99)
STRETCH_MIN_SPAN = 32  # grey levels: a near-uniform crop (no cell, blank frame) is not blown up


class ImageError(BmcError, ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image format)."""


class ContractError(BmcError, ValueError):
    """A contract that cannot be honoured (unknown schema, missing field, bad value)."""


@dataclasses.dataclass(frozen=True)
class Contract:
    """How an image becomes a model input, and what the model's outputs mean."""

    labels: tuple[str, ...]
    input_size: int = 224
    color_order: str = "RGB"
    crop_fraction: float = 0.72
    interpolation: str = "area"
    input_range: tuple[float, float] = (0.0, 255.0)
    normalisation: str = "in-model"
    cell_fraction: float = 0.45
    stain_norm: str = "none"
    lamp: tuple[float, float, float] | None = None  # the training images' background, RGB
    # stage -> coarse parent (promyelocyte -> ig, band -> neutrophil): a stage model's hierarchy
    parents: dict[str, str] | None = dataclasses.field(default=None, hash=False)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(
                f"contract schema version {self.schema_version} is not supported "
                f"(this bmc reads version {SCHEMA_VERSION})"
            )
        if not self.labels:
            raise ContractError("contract has no labels")
        if len(set(self.labels)) != len(self.labels):
            raise ContractError(f"contract labels are not unique: {list(self.labels)}")
        if self.color_order != "RGB":
            raise ContractError(f"color_order must be 'RGB', got {self.color_order!r}")
        if not 0.1 <= self.crop_fraction <= 1.0:
            raise ContractError(f"crop_fraction must be in [0.1, 1], got {self.crop_fraction}")
        if not 0.05 <= self.cell_fraction <= 1.0:
            raise ContractError(f"cell_fraction must be in [0.05, 1], got {self.cell_fraction}")
        if self.interpolation not in INTERPOLATIONS:
            raise ContractError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.stain_norm not in STAIN_NORMS:
            raise ContractError(f"stain_norm must be one of {STAIN_NORMS}, got {self.stain_norm!r}")
        if self.lamp is not None and (len(self.lamp) != 3 or not all(0 < v <= 255 for v in self.lamp)):
            raise ContractError(f"lamp must be three RGB levels in (0, 255], got {self.lamp}")
        if self.input_size < 32:
            raise ContractError(f"input_size must be >= 32, got {self.input_size}")
        if self.parents is not None:
            if not isinstance(self.parents, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.parents.items()
            ):
                raise ContractError(f"parents must map label names to parent names, got {self.parents!r}")
            stray = sorted(set(self.parents) - set(self.labels))
            if stray:
                raise ContractError(f"parents names label(s) the model does not have: {stray}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["input_range"] = list(self.input_range)
        if self.lamp is not None:
            d["lamp"] = list(self.lamp)
        if self.parents is None:
            del d["parents"]  # an 8-class model's contract reads as it always did
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Contract":
        if not isinstance(d, dict):
            raise ContractError(f"contract must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ContractError(f"unknown contract field(s) {unknown}; known: {sorted(known)}")
        if "labels" not in d:
            raise ContractError("contract has no 'labels'")
        kw = dict(d)
        kw["labels"] = tuple(kw["labels"])
        if "input_range" in kw:
            kw["input_range"] = tuple(kw["input_range"])
        if kw.get("lamp") is not None:
            kw["lamp"] = tuple(float(v) for v in kw["lamp"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "Contract":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ContractError(f"contract is not valid JSON: {e}") from e


def to_rgb(image: np.ndarray, pixel_format: str) -> np.ndarray:
    """Return an HxWx3 uint8 RGB view of ``image`` given the format its source declared."""
    if pixel_format not in PIXEL_FORMATS:
        raise ContractError(f"unknown pixel format {pixel_format!r}; expected one of {PIXEL_FORMATS}")
    if image.dtype != np.uint8:
        raise ContractError(f"expected a uint8 image, got {image.dtype}")
    if pixel_format == "GRAY" or image.ndim == 2:
        if image.ndim == 3:
            image = image[..., 0]
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ContractError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[..., :3]
    if pixel_format == "BGR":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def centre_square(image: np.ndarray, fraction: float) -> np.ndarray:
    """The centred square of side ``fraction * min(h, w)`` (integer pixel bounds)."""
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    top = (h - side) // 2
    left = (w - side) // 2
    return image[top : top + side, left : left + side]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB uint8 image in OpenCV's exact fixed-point arithmetic."""
    r, g, b = (rgb[..., k].astype(np.int32) for k in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)


def stretch_levels(rgb: np.ndarray) -> tuple[int, int]:
    """(low, high) grey levels of the ``"stretch"`` normalisation: luminance percentiles."""
    hist = np.bincount(luminance(rgb).ravel(), minlength=256)
    cum = np.cumsum(hist)
    n = cum[-1]
    lo = int(np.searchsorted(cum, STRETCH_PERCENTILES[0] * n))
    hi = int(np.searchsorted(cum, STRETCH_PERCENTILES[1] * n))
    if hi - lo < STRETCH_MIN_SPAN:
        mid = (lo + hi) / 2
        lo = int(np.floor(max(0.0, min(mid - STRETCH_MIN_SPAN / 2, 255 - STRETCH_MIN_SPAN))))
        hi = lo + STRETCH_MIN_SPAN
    return lo, hi


def stretch_lut(lo: int, hi: int) -> np.ndarray:
    """The 256-entry table mapping ``lo`` → 0 and ``hi`` → 255 (float32 arithmetic, clipped)."""
    v = np.arange(256, dtype=np.float32)
    lut: np.ndarray = np.clip(np.round((v - np.float32(lo)) * np.float32(255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return lut


def normalise_stain(rgb: np.ndarray, method: str) -> np.ndarray:
    """Apply the contract's ``stain_norm`` to an RGB uint8 image (see the module docstring)."""
    if method == "none":
        return rgb
    if method == "stretch":
        return cv2.LUT(np.ascontiguousarray(rgb), stretch_lut(*stretch_levels(rgb)))
    raise ContractError(f"stain_norm must be one of {STAIN_NORMS}, got {method!r}")


def lamp_of(image: np.ndarray, step: int = 4) -> np.ndarray:
    """An image's background level per channel (in its own channel order): the 99th percentile of
    every ``step``-th pixel — the bright plasma between the cells, lit by the lamp."""
    sample = image[::step, ::step].reshape(-1, image.shape[2] if image.ndim == 3 else 1)
    lamp: np.ndarray = np.maximum(np.percentile(sample, 99, axis=0), 1.0).astype(np.float32)
    return lamp


def white_balance(image: np.ndarray, seen: np.ndarray, lamp: Sequence[float]) -> np.ndarray:
    """``image`` (uint8, same channel order as ``seen`` and ``lamp``) with a background of ``seen``
    brought to ``lamp``: one gain per channel, as a camera's white balance."""
    gain = np.asarray(lamp, np.float32) / np.asarray(seen, np.float32)
    return np.clip(image.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def prepare(image: np.ndarray, contract: Contract, pixel_format: str = "BGR", *, crop: bool = True) -> np.ndarray:
    """One image → the model input as uint8 (``input_size``², RGB): colour order, crop, resize,
    stain normalisation.

    ``crop=False`` skips the centre crop, for cell crops that the edge app already cut at the
    contract's ``cell_fraction``.
    """
    rgb = to_rgb(image, pixel_format)
    if crop:
        rgb = centre_square(rgb, contract.crop_fraction)
    size = contract.input_size
    if rgb.shape[0] != size or rgb.shape[1] != size:
        rgb = cv2.resize(rgb, (size, size), interpolation=INTERPOLATIONS[contract.interpolation])
    return normalise_stain(rgb, contract.stain_norm)


def preprocess(image: np.ndarray, contract: Contract, pixel_format: str = "BGR", *, crop: bool = True) -> np.ndarray:
    """One image → one model input (float32, ``input_size``², RGB, 0..255); see :func:`prepare`."""
    return prepare(image, contract, pixel_format, crop=crop).astype(np.float32)


def preprocess_batch(
    images: Sequence[np.ndarray], contract: Contract, pixel_format: str = "BGR", *, crop: bool = True
) -> np.ndarray:
    return np.stack([preprocess(im, contract, pixel_format, crop=crop) for im in images])


def read_image(path: str) -> np.ndarray:
    """Decode an image file to BGR uint8, or raise ``ValueError`` naming the file."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image (empty, truncated or not an image format)")
    return image

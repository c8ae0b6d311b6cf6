"""The TFLite variants the kit builds, by name — one table that ``bmc convert`` and ``bmc bench`` read.

Named choices after MediaPipe Model Maker's ``QuantizationConfig.for_int8/for_float16/
for_dynamic``: :func:`float32`, :func:`float16`, :func:`dynamic` and :func:`int8`. Full-integer
int8 takes uint8 pixels in and gives uint8 scores out with only int8 builtin ops — the form the
Coral Edge TPU compiler and the fastest CPU kernels want.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from bmc.errors import BmcError


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: how a variant is named, stored and reported."""

    name: str
    suffix: str
    format: str
    description: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("float32", "_fp32.tflite", "tflite-fp32", "float32 weights and activations"),
        Variant("float16", "_fp16.tflite", "tflite-fp16", "float16 weights, float32 compute"),
        Variant("dynamic", "_dynamic.tflite", "tflite-dynamic", "int8 weights, float activations"),
        Variant("int8", "_int8.tflite", "tflite-int8", "full integer: uint8 in/out, int8 builtin ops"),
    )
}


class VariantError(BmcError, ValueError):
    pass


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise VariantError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}") from None


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What the TFLite converter is asked to do for one variant."""

    variant: Variant
    representative: Callable[[], Iterable[np.ndarray]] | None = None
    float_layers: tuple[str, ...] = ()  # int8 only: layers kept in float (selective quantization)


def float32() -> Quantization:
    return Quantization(VARIANTS["float32"])


def float16() -> Quantization:
    return Quantization(VARIANTS["float16"])


def dynamic() -> Quantization:
    return Quantization(VARIANTS["dynamic"])


def int8(representative_images: np.ndarray, float_layers: Iterable[str] = ()) -> Quantization:
    """Full-integer quantization calibrated on ``representative_images``.

    The images must be model inputs exactly as at inference — contract-preprocessed RGB floats in
    0..255 — or the calibrated ranges are wrong and int8 accuracy silently collapses.
    """
    images = np.asarray(representative_images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise VariantError(f"representative images must be N x H x W x 3, got {images.shape}")
    if images.max() <= 1.0 + 1e-6:
        raise VariantError(
            "representative images are in 0..1, but the model takes 0..255 pixels (the contract's "
            "input_range): calibrating on them would ruin int8 accuracy"
        )

    def gen():
        for x in images:
            yield [x[None]]

    return Quantization(VARIANTS["int8"], gen, tuple(float_layers))

"""Augmentation for stained cell images, in numpy + OpenCV.

Chosen for what changes between microscopes, stains and cameras rather than for what changes
within one CellaVision release: orientation (cells have no up), scale (objective and camera
pixel size), stain intensity and hue (May-Grünwald-Giemsa vs Wright, staining time), white
balance, focus, sensor noise and JPEG compression. Every transform keeps the label.

Applied to a contract-cropped RGB uint8 image; :func:`augmented_view` returns a model input of
the contract's size, so the training cache and the device see the same geometry. The contract's
stain normalisation comes last, after every augmentation, as on the device where it comes after
the camera: the model learns on exactly what the device will feed it.

Stain variation is modelled physically as well as photographically: in optical density
(Beer–Lambert, ``OD = -log(I / I0)``) a lighter or darker stain scales the density of each dye,
which is how a pale smear from another laboratory differs from a CellaVision image (a washed-out
lilac nucleus rather than a dark purple one), and what a hue shift or a contrast change alone
does not reproduce; and a random linear map of the densities (:func:`stain_mix`) turns each dye's
colour on its own (bluer nuclei with more orange red cells, as in a Wright-stained smear under
a cooler lamp), which a global hue rotation cannot.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from bmc.contract import INTERPOLATIONS, Contract, normalise_stain, prepare, to_rgb


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    scale_jitter: float = 0.15  # crop side x U(1-s, 1+s)
    shift: float = 0.06  # crop centre offset, fraction of the crop side
    p_edge: float = 0.15  # a cell at the field's edge: one side of the crop filled flat
    edge_fraction: tuple[float, float] = (0.05, 0.3)
    p_stain: float = 0.8
    stain_density: tuple[float, float] = (0.4, 1.3)  # optical density x U(lo, hi), all dyes
    stain_channel: float = 0.15  # and x U(1-c, 1+c) per colour channel
    p_mix: float = 0.5
    stain_mix: float = 0.2  # OD' = (I + E) OD, E ~ U(-m, m): each dye's colour shifts on its own
    illuminant: tuple[float, float] = (0.82, 1.0)  # background brightness per channel (lamp colour)
    hue_deg: float = 22.0
    saturation: tuple[float, float] = (0.5, 1.35)
    brightness: float = 0.15
    contrast: tuple[float, float] = (0.5, 1.25)
    channel_gain: float = 0.12
    gamma: tuple[float, float] = (0.75, 1.35)
    p_blur: float = 0.6
    blur_sigma: tuple[float, float] = (0.4, 3.0)
    p_lowres: float = 0.3
    lowres_factor: tuple[float, float] = (1.5, 3.0)  # camera resolution: down by f, back up
    p_noise: float = 0.4
    noise_sigma: tuple[float, float] = (2.0, 9.0)
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (35, 90)


# The first view of every training image: geometry and a touch of colour only, so that the model
# also sees cells as the training microscope shows them.
LIGHT = AugmentConfig(
    p_edge=0.0,
    p_stain=0.0,
    p_mix=0.0,
    hue_deg=3.0,
    saturation=(0.9, 1.1),
    brightness=0.05,
    contrast=(0.9, 1.1),
    channel_gain=0.03,
    gamma=(0.95, 1.05),
    p_blur=0.0,
    p_lowres=0.0,
    p_noise=0.0,
    p_jpeg=0.0,
)


def _crop(rgb: np.ndarray, contract: Contract, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    side = min(h, w) * contract.crop_fraction * rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
    side = int(round(min(side, min(h, w))))
    cy = h / 2 + rng.uniform(-cfg.shift, cfg.shift) * side
    cx = w / 2 + rng.uniform(-cfg.shift, cfg.shift) * side
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    return rgb[top : top + side, left : left + side]


def field_edge(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """A cell near the edge of a camera field: the edge app fills the part of its crop outside the
    field with the crop's median colour (:func:`bmc.edge_app.cells.crop_cell`); so does this."""
    if rng.random() >= cfg.p_edge:
        return rgb
    side = rgb.shape[0]
    k = max(1, int(side * rng.uniform(*cfg.edge_fraction)))
    at_start = int(rng.integers(2)) == 0  # the field ends at the top / left (else bottom / right)
    band = slice(0, k) if at_start else slice(side - k, side)
    rest = slice(k, None) if at_start else slice(None, side - k)
    out = rgb.copy()
    if rng.random() < 0.5:  # a horizontal band
        out[band] = np.median(rgb[rest], axis=(0, 1)).astype(np.uint8)
    else:
        out[:, band] = np.median(rgb[:, rest], axis=(0, 1)).astype(np.uint8)
    return out


def stain_jitter(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Lighter or darker staining: scale the optical density, overall and per channel."""
    if rng.random() >= cfg.p_stain:
        return rgb
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    od *= rng.uniform(*cfg.stain_density) * rng.uniform(1 - cfg.stain_channel, 1 + cfg.stain_channel, size=3)
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).astype(np.uint8)


def stain_mix(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Another laboratory's dyes and lamp: a random linear map of the optical densities.

    Between May-Grünwald-Giemsa and Wright stains, staining times and buffers, each dye's colour
    moves on its own (nuclei bluer while red cells turn orange), which neither a global hue shift
    nor a density scale reproduces: ``OD' = (I + E) OD`` with ``E`` uniform in ``±stain_mix``
    mixes the channels' densities, so every dye's colour vector turns and stretches differently.
    The background (lamp colour, white balance) is then rescaled per channel.
    """
    if rng.random() >= cfg.p_mix:
        return rgb
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    mix = np.eye(3, dtype=np.float32) + rng.uniform(-cfg.stain_mix, cfg.stain_mix, size=(3, 3)).astype(np.float32)
    od = np.maximum(od @ mix.T, 0.0)
    lamp = 256.0 * rng.uniform(*cfg.illuminant, size=3).astype(np.float32)
    return np.clip(lamp * np.exp(-od) - 1.0, 0, 255).astype(np.uint8)


def colour_jitter(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Stain and white-balance variation: hue, saturation, gains, brightness, contrast, gamma."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue_deg, cfg.hue_deg) * 256 / 360) % 256
    hsv[..., 1] *= rng.uniform(*cfg.saturation)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
    out *= 1 + rng.uniform(-cfg.channel_gain, cfg.channel_gain, size=3)
    mean = out.mean()
    out = (out - mean) * rng.uniform(*cfg.contrast) + mean * (1 + rng.uniform(-cfg.brightness, cfg.brightness))
    out = np.clip(out, 0, 255) / 255.0
    out = out ** rng.uniform(*cfg.gamma)
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)


def degrade(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Optics and camera: defocus blur, low camera resolution, sensor noise, JPEG artefacts."""
    if rng.random() < cfg.p_blur:
        rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.p_lowres:
        h, w = rgb.shape[:2]
        f = rng.uniform(*cfg.lowres_factor)
        small = cv2.resize(rgb, (max(8, int(w / f)), max(8, int(h / f))), interpolation=cv2.INTER_AREA)
        rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < cfg.p_noise:
        noise = rng.normal(0, rng.uniform(*cfg.noise_sigma), rgb.shape)
        rgb = np.clip(rgb.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_jpeg:
        ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(*cfg.jpeg_quality))])
        if ok:
            rgb = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return rgb


def augmented_view(
    image: np.ndarray,
    contract: Contract,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    pixel_format: str = "BGR",
) -> np.ndarray:
    """One randomly augmented model input (uint8 RGB, contract size) from a decoded image."""
    rgb = _crop(to_rgb(image, pixel_format), contract, cfg, rng)
    size = contract.input_size
    rgb = cv2.resize(rgb, (size, size), interpolation=INTERPOLATIONS[contract.interpolation])
    k = int(rng.integers(4))
    if k:
        rgb = np.rot90(rgb, k)
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    rgb = np.ascontiguousarray(rgb)
    rgb = colour_jitter(stain_mix(stain_jitter(field_edge(rgb, cfg, rng), cfg, rng), cfg, rng), cfg, rng)
    return normalise_stain(degrade(rgb, cfg, rng), contract.stain_norm)


def plain_view(image: np.ndarray, contract: Contract, pixel_format: str = "BGR") -> np.ndarray:
    """The un-augmented model input as uint8 (the contract's own :func:`bmc.contract.prepare`)."""
    return prepare(image, contract, pixel_format)

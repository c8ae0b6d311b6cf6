"""Training augmentation on real PBC cells: what the model sees is what the device will feed it."""

import cv2
import numpy as np

from bmc.contract import Contract, luminance, normalise_stain, prepare, read_image
from bmc.train.augment import LIGHT, AugmentConfig, augmented_view, stain_jitter, stain_mix


def _cell(pbc, cls="neutrophil", i=3):
    return read_image(str(sorted((pbc / cls).glob("*.jpg"))[i]))


def test_views_are_seeded_and_shaped_like_model_inputs(pbc):
    c = Contract(labels=("x",), stain_norm="stretch")
    img = _cell(pbc)
    a = augmented_view(img, c, np.random.default_rng(7))
    b = augmented_view(img, c, np.random.default_rng(7))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augmented_view(img, c, np.random.default_rng(8)))


def test_views_end_stain_normalised_as_on_the_device(pbc):
    """Whatever the augmentation did to contrast and brightness, the view the model gets is already
    normalised (normalising it again changes little: only where a saturated colour clips a channel);
    without normalisation it is not."""
    img = _cell(pbc, "eosinophil")

    def change(contract, seed):
        v = augmented_view(img, contract, np.random.default_rng(seed))
        return np.abs(normalise_stain(v, "stretch").astype(np.float32) - v).mean()

    norm, raw = Contract(labels=("x",), stain_norm="stretch"), Contract(labels=("x",))
    assert np.median([change(norm, s) for s in range(12)]) < 8
    assert np.mean([change(raw, s) for s in range(12)]) > 3 * np.mean([change(norm, s) for s in range(12)])


def test_stain_jitter_lightens_and_darkens_the_nucleus(pbc):
    rgb = prepare(_cell(pbc), Contract(labels=("x",)))
    dark = luminance(rgb) < 120
    light = stain_jitter(
        rgb, AugmentConfig(p_stain=1.0, stain_density=(0.45, 0.45), stain_channel=0.0), np.random.default_rng(0)
    )
    heavy = stain_jitter(
        rgb, AugmentConfig(p_stain=1.0, stain_density=(1.3, 1.3), stain_channel=0.0), np.random.default_rng(0)
    )
    y = lambda x: luminance(x)[dark].mean()  # noqa: E731
    assert y(light) > y(rgb) + 40
    assert y(heavy) < y(rgb) - 5
    # LIGHT, the first view of every image, never restains
    assert LIGHT.p_stain == 0.0 and LIGHT.p_blur == 0.0


def test_stain_mix_turns_each_dye_on_its_own(pbc):
    """Another lab's dyes: after a stain mix the nucleus and the red cells change colour by
    different amounts (no single hue rotation or gain), and the light first view never mixes."""
    rgb = prepare(_cell(pbc), Contract(labels=("x",)))
    lum = luminance(rgb)
    nucleus, red_cells = lum < 110, (lum > 150) & (lum < 215)
    cfg = AugmentConfig(p_mix=1.0)

    def hue_shift(a, b, where):
        ha = cv2.cvtColor(a, cv2.COLOR_RGB2HSV_FULL)[..., 0][where].astype(np.int16)
        hb = cv2.cvtColor(b, cv2.COLOR_RGB2HSV_FULL)[..., 0][where].astype(np.int16)
        d = (hb - ha + 128) % 256 - 128
        return float(np.median(d))

    gaps = []
    for seed in range(8):
        mixed = stain_mix(rgb, cfg, np.random.default_rng(seed))
        assert mixed.shape == rgb.shape and mixed.dtype == np.uint8
        gaps.append(abs(hue_shift(rgb, mixed, nucleus) - hue_shift(rgb, mixed, red_cells)))
    assert max(gaps) > 8  # hue steps of 256 per turn: > 11 degrees between the two dyes
    np.testing.assert_array_equal(stain_mix(rgb, LIGHT, np.random.default_rng(0)), rgb)

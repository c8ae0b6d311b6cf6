import cv2
import numpy as np
import pytest

from bmc.contract import Contract, ContractError, centre_square, preprocess, read_image, to_rgb


def test_contract_round_trips_through_json():
    c = Contract(labels=("a", "b"), input_size=192, crop_fraction=0.8)
    assert Contract.from_json(c.to_json()) == c
    lit = Contract(labels=("a",), lamp=(255.0, 232.0, 205.0))
    assert Contract.from_json(lit.to_json()) == lit and Contract.from_json(lit.to_json()).lamp == (255.0, 232.0, 205.0)
    with pytest.raises(ContractError, match="lamp"):
        Contract(labels=("a",), lamp=(255.0, 0.0, 205.0))


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
    from bmc.train.tf_preprocess import tf_preprocess_file

    c = Contract(labels=("x",))
    files = [sorted((pbc / d).glob("*.jpg"))[3] for d in ("basophil", "ig", "platelet")]
    files += sorted(matek.glob("BLA/*.jpg"))[:1]
    for f in files:
        ours = preprocess(read_image(str(f)), c, "BGR")
        tfs = tf_preprocess_file(str(f), c).numpy()
        assert tfs.shape == ours.shape
        assert np.abs(tfs - ours).max() <= 1.0, f


def _pale(rgb, density):
    """The same smear stained ``density`` times as strongly (Beer–Lambert), as another lab's might be."""
    od = -np.log((rgb.astype(np.float32) + 1) / 256) * density
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def test_stretch_gives_a_pale_stain_the_training_contrast(pbc):
    """A washed-out smear reaches the model much closer to the normally stained one, hue kept."""
    from bmc.contract import luminance, prepare

    rgb = cv2.cvtColor(read_image(str(sorted((pbc / "neutrophil").glob("*.jpg"))[7])), cv2.COLOR_BGR2RGB)
    pale = _pale(rgb, 0.45)
    plain, norm = Contract(labels=("x",)), Contract(labels=("x",), stain_norm="stretch")
    ref = prepare(rgb, norm, "RGB").astype(np.float32)
    without = np.abs(prepare(pale, plain, "RGB").astype(np.float32) - prepare(rgb, plain, "RGB")).mean()
    with_norm = np.abs(prepare(pale, norm, "RGB").astype(np.float32) - ref).mean()
    assert with_norm < 0.6 * without, (with_norm, without)

    # the nucleus (darkest tenth): 65 grey levels paler raw, within 25 once normalised; still violet
    def nucleus(x):
        y = luminance(x)
        return x[y <= np.percentile(y, 10)].astype(np.float32)

    raw_gap = (
        luminance(nucleus(prepare(pale, plain, "RGB")).astype(np.uint8)[None]).mean()
        - luminance(nucleus(prepare(rgb, plain, "RGB")).astype(np.uint8)[None]).mean()
    )
    out = nucleus(prepare(pale, norm, "RGB"))
    gap = (
        luminance(out.astype(np.uint8)[None]).mean()
        - luminance(nucleus(ref.astype(np.uint8)).astype(np.uint8)[None]).mean()
    )
    assert raw_gap > 50 and gap < 25, (raw_gap, gap)
    assert out[:, 2].mean() > out[:, 1].mean() and out[:, 0].mean() > out[:, 1].mean()


def test_stretch_does_not_blow_up_a_blank_frame():
    from bmc.contract import normalise_stain

    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(200, 2, (224, 224, 3)), 0, 255).astype(np.uint8)
    out = normalise_stain(blank, "stretch").astype(np.float32)
    assert out.std() < 8 * blank.astype(np.float32).std() + 1
    with pytest.raises(ContractError, match="stain_norm must be one of"):
        Contract(labels=("x",), stain_norm="reinhard")


def test_contract_without_stain_norm_is_the_old_behaviour(pbc):
    """Model cards written before ``stain_norm`` existed load, and their models get raw pixels."""
    d = Contract(labels=("x",)).to_dict()
    del d["stain_norm"]
    old = Contract.from_dict(d)
    assert old.stain_norm == "none"
    img = read_image(str(next((pbc / "monocyte").glob("*.jpg"))))
    rgb = cv2.cvtColor(centre_square(img, old.crop_fraction), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(preprocess(img, old), cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA))


def test_tensorflow_stretch_is_exactly_the_numpy_one(pbc, matek):
    from bmc.contract import normalise_stain, prepare
    from bmc.train.tf_preprocess import _tf_stretch

    c = Contract(labels=("x",))
    files = [sorted((pbc / d).glob("*.jpg"))[2] for d in ("eosinophil", "lymphocyte")]
    files += sorted(matek.glob("EBO/*.jpg"))[:1]
    images = [prepare(read_image(str(f)), c) for f in files]
    images.append(np.full((64, 64, 3), 250, np.uint8))
    for x in images:
        ours = normalise_stain(x, "stretch").astype(np.float32)
        np.testing.assert_array_equal(_tf_stretch(x.astype(np.float32)).numpy(), ours)

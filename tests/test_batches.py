"""The end-to-end (GPU) path's batches, on real PBC cells: reproducible, weighted, and honest about
unreadable images."""

import numpy as np

from bmc.contract import Contract, prepare, read_image
from bmc.train.augment import AugmentConfig
from bmc.train.batches import Batches
from bmc.train.data import Sample

LABELS = ("eosinophil", "neutrophil")


def _samples(pbc, tmp_path):
    rows = [Sample(str(p), label) for label in LABELS for p in sorted((pbc / label).glob("*.jpg"))[:5]]
    bad = tmp_path / "EO_truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return rows + [Sample(str(bad), "eosinophil")]


def test_batches_are_drawn_from_seed_epoch_and_index(pbc, tmp_path):
    samples = _samples(pbc, tmp_path)
    contract = Contract(labels=LABELS, stain_norm="stretch")
    index = {l: i for i, l in enumerate(LABELS)}

    def make():
        return Batches(samples, index, contract, 4, AugmentConfig(), seed=5, class_weight={0: 2.0, 1: 0.5})

    a, b = make(), make()
    assert len(a) == 3  # 11 images, 4 a batch
    x, y, _ = a[0]
    assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32 and y.shape == (4, 2)
    np.testing.assert_array_equal(x, b[0][0])  # the same seed, epoch and index: the same views
    batches = [a[i] for i in range(len(a))]
    y, w = np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches])
    # the class weights, and weight 0 for the one unreadable image, which is listed by name
    bad = np.flatnonzero(w == 0)
    assert len(bad) == 1 and a.order[bad[0]] == len(samples) - 1
    np.testing.assert_array_equal(np.delete(w, bad), np.where(np.delete(y, bad, 0)[:, 0] == 1, 2.0, 0.5))
    assert [p for p, _ in a.skipped] == [samples[-1].path] and "not a readable image" in a.skipped[0][1]

    a.on_epoch_end()  # a new epoch: another order and other augmentations
    assert not np.array_equal(batches[0][0], a[0][0])


def test_validation_batches_are_plain_and_in_order(pbc, tmp_path):
    samples = _samples(pbc, tmp_path)[:10]
    contract = Contract(labels=LABELS, stain_norm="stretch")
    v = Batches(samples, {l: i for i, l in enumerate(LABELS)}, contract, 4, None, seed=5)
    (x,) = v[0]
    np.testing.assert_array_equal(x[1], prepare(read_image(samples[1].path), contract).astype(np.float32))
    v.on_epoch_end()
    np.testing.assert_array_equal(v[0][0], x)

"""Class activation maps of the shipped model, in numpy on the device, on real PBC cells."""

from __future__ import annotations

import numpy as np

from bmc.contract import preprocess, read_image
from bmc.edge_app.activation_maps import ActivationMaps, overlay
from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier


def test_the_map_of_the_called_class_lies_on_the_cell(pbc):
    """PBC cells are centred in their images: the map of the class the model calls puts more weight
    on the middle of the crop (where the cell is) than on its border (red cells, background)."""
    clf = CellClassifier(DEFAULT_MODEL, orientations=1)
    maps = ActivationMaps(clf)
    inside_wins = 0
    folders = sorted(d for d in pbc.iterdir() if d.is_dir())
    for folder in folders:
        x = preprocess(read_image(str(sorted(folder.glob("*.jpg"))[0])), clf.contract, "BGR")
        label = clf.labels[int(np.argmax(clf.predict(x[None])[0]))]
        cam = maps(x, label)
        assert cam.shape == x.shape[:2] and 0 <= cam.min() and cam.max() == 1.0
        h, w = cam.shape
        centre = cam[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()
        ring = np.concatenate(
            [cam[: h // 8].ravel(), cam[-h // 8 :].ravel(), cam[:, : w // 8].ravel(), cam[:, -w // 8 :].ravel()]
        )
        inside_wins += centre > ring.mean()
        picture = overlay(x, cam)
        assert picture.shape == (h, w, 3) and picture.dtype == np.uint8
    assert inside_wins >= len(folders) - 1, f"the map lies on the cell for only {inside_wins} of {len(folders)} classes"

"""Batches of training images for ``model.fit`` on any Keras backend (the end-to-end GPU path).

A ``keras.utils.PyDataset``: worker processes decode and augment (threads would serialise on the
GIL: the augmentations are many small numpy steps), and the batch order and every augmentation
are drawn from ``(seed, epoch, index)``, so that a run is reproducible whatever the number of
workers. An unreadable image gets weight 0 and is listed in ``skipped``, never silently dropped.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from bmc.contract import Contract, read_image
from bmc.train.augment import AugmentConfig, augmented_view, plain_view


class Batches(keras.utils.PyDataset):
    """``(x, y, weight)`` batches, augmented afresh each epoch; ``(x,)`` when ``aug`` is None."""

    def __init__(
        self,
        samples,
        index: dict[str, int],
        contract: Contract,
        batch_size: int,
        aug: AugmentConfig | None,
        seed: int,
        class_weight: dict[int, float] | None = None,
        workers: int = 1,
        targets: np.ndarray | None = None,
    ):
        super().__init__(workers=workers, use_multiprocessing=workers > 1, max_queue_size=4 * workers)
        self.samples, self.index, self.contract = samples, index, contract
        self.batch_size, self.aug, self.seed, self.class_weight = batch_size, aug, seed, class_weight
        # one target row per true class (soft: label smoothing, neighbouring stages); one-hot when None
        self.targets = np.eye(contract.num_classes, dtype=np.float32) if targets is None else targets
        self.skipped: list[tuple[str, str]] = []  # (path, why), as met in this process
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.aug is None:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()

    def __getitem__(self, i: int):
        size, n = self.contract.input_size, self.contract.num_classes
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        x = np.zeros((len(idx), size, size, 3), np.float32)
        y = np.zeros((len(idx), n), np.float32)
        w = np.ones(len(idx), np.float32)
        for j, k in enumerate(idx):
            s = self.samples[k]
            y[j] = self.targets[self.index[s.label]]
            try:
                img = read_image(s.path)
            except ValueError as e:
                if (s.path, str(e)) not in self.skipped:
                    self.skipped.append((s.path, str(e)))
                w[j] = 0.0
                continue
            if self.aug is None:
                x[j] = plain_view(img, self.contract)
            else:
                x[j] = augmented_view(
                    img, self.contract, np.random.default_rng([self.seed, self.epoch, int(k)]), self.aug
                )
            if self.class_weight:
                w[j] = self.class_weight[self.index[s.label]]
        return (x,) if self.aug is None else (x, y, w)

"""What ``bmc train`` is asked to do: one dataclass, the single source of every training default.

The command line builds its options' defaults from these fields, and the run folder's
``config.json`` records them all, so a run is reproduced from its folder alone. Importing this
module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses

from bmc.errors import BmcError

MODES = ("auto", "cached", "full")
STRATEGIES = ("auto", "default", "mirrored")


class TrainError(BmcError, ValueError):
    """A training run that cannot be done as asked; the message says why."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``bmc train`` needs; written to ``config.json`` in the run folder."""

    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    label_from: str = "folder"
    manifest: str | None = None
    label_column: str = "label"
    group_column: str | None = "group"
    split_file: str | None = None
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 1337
    limit_per_class: int | None = None
    input_size: int = 224
    crop_fraction: float = 0.72
    cell_fraction: float | None = None  # None: measured on the training images
    stain_norm: str = "stretch"  # the contract's per-image colour normalisation
    mode: str = "auto"
    fine_tune_from: str = "block6a"
    views: int = 2
    batch_size: int = 32
    head_epochs: int = 40
    head_lr: float = 3e-3
    fine_tune_epochs: int = 6
    fine_tune_lr: float = 3e-4
    dropout: float = 0.3
    label_smoothing: float = 0.05
    # share of the target given to the adjacent maturation stages (a stage model; no effect on classes
    # that have no neighbouring stage among the labels)
    neighbour_smoothing: float = 0.1
    class_weights: bool = True
    patience: int = 3
    # the head phase on cached features is cheap and noisy: it waits longer before it stops
    head_patience: int = 5
    # the head phase of the end-to-end (GPU) path runs at most this many epochs
    full_head_epochs: int = 10
    strategy: str = "auto"
    mixed_precision: str = "auto"
    init_from: str | None = None  # a trained model.keras to start from (backbone, and head if same classes)

    def __post_init__(self):
        from bmc.train.backbones import BACKBONES, backbone_blocks  # numpy only: no TensorFlow

        if self.backbone in BACKBONES and self.fine_tune_from not in backbone_blocks(self.backbone):
            blocks = backbone_blocks(self.backbone)
            raise TrainError(
                f"unknown block {self.fine_tune_from!r} for {self.backbone}; choose one of {', '.join(blocks)}"
            )
        if self.mode not in MODES:
            raise TrainError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.strategy not in STRATEGIES:
            raise TrainError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.views < 1:
            raise TrainError(f"views must be >= 1, got {self.views}")
        if (
            self.label_smoothing < 0
            or self.neighbour_smoothing < 0
            or self.label_smoothing + self.neighbour_smoothing >= 1
        ):
            raise TrainError(
                f"label_smoothing ({self.label_smoothing}) and neighbour_smoothing "
                f"({self.neighbour_smoothing}) must be >= 0 and add up to less than 1"
            )


def default(name: str):
    """The default of one :class:`TrainConfig` field."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]

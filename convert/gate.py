"""The conversion gate's thresholds: the single source of their defaults (the CLI reads them here)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gate:
    """How much a converted variant may lose against the float model on the held-out split."""

    max_drop: float = 1.0  # accuracy points
    max_class_drop: float = 3.0  # recall points, any class

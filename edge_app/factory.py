"""One way to set up a count: the classifier and the session settings of a device configuration.

``bmc edge run``, ``bmc edge serve`` and the screen's Live page all start counts; each calls
:func:`classifier` and :func:`session_config` here, so that the model, its threads and
orientations, and every session setting are read from :mod:`bmc.edge_app.config` the same way (the
command line's own flags are a :class:`~bmc.edge_app.config.ModelConfig` and overrides).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bmc.edge_app.config import DeviceConfig, ModelConfig

if TYPE_CHECKING:
    from bmc.edge_app.app import SessionConfig
    from bmc.edge_app.classifier import CellClassifier


def classifier(model: ModelConfig, path: str | Path | None = None) -> CellClassifier:
    """The classifier ``model`` describes; ``path`` (a model a person made active, a flag) before
    ``model.path``, before the shipped model. Threads 0 means every core."""
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

    return CellClassifier(
        path or model.path or DEFAULT_MODEL,
        threads=model.threads or os.cpu_count(),
        orientations=model.orientations,
    )


def session_config(cfg: DeviceConfig, **overrides: Any) -> SessionConfig:
    """The session settings of a device configuration, for a count nobody watches in a window
    (the service, the screen); ``overrides``: fields of :class:`bmc.edge_app.app.SessionConfig`."""
    from bmc.edge_app.app import SessionConfig

    s = cfg.session
    settings = SessionConfig(
        mode=s.mode,
        target=s.target or None,
        headless=True,
        save_crops=s.save_crops,
        cell_diameter_px=s.cell_diameter_px or None,
        print_every_s=s.print_every_s,
        specimen=s.specimen or None,
        finder=cfg.finder,
        review=cfg.review,
        white_balance=cfg.model.white_balance,
        on_existing="refuse",
    )
    return dataclasses.replace(settings, **overrides)

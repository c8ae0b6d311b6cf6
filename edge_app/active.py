"""Which model the device counts with: the shipped one, or a model adapted here that a person made
active (``bmc edge ui``'s adaptation page).

Adapted models live in the models folder beside the storage folder (``/var/lib/bmc/models`` for
``/var/lib/bmc/sessions``); ``active.json`` there names the active one, who chose it and when.
``bmc edge serve`` reads it before each session, so a change takes effect at the next session.
A model is checked (card, outputs, head) before it is made active; a pointer that leads outside the
models folder or to a model that no longer loads is ignored with a warning, never followed.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

from bmc.errors import BmcError

log = logging.getLogger(__name__)
ACTIVE = "active.json"


class ActiveModelError(BmcError, ValueError):
    pass


def models_dir(storage: str | Path) -> Path:
    return Path(storage).resolve().parent / "models"


def adapted_models(storage: str | Path) -> list[Path]:
    d = models_dir(storage)
    if not d.is_dir():
        return []
    # a model of either runtime (.tflite: LiteRT, .onnx: ONNX Runtime), each beside its card
    return sorted(p for p in d.iterdir() if p.suffix in (".tflite", ".onnx") and p.with_suffix(".json").is_file())


def active_model(storage: str | Path) -> Path | None:
    """The adapted model made active, or None for the shipped (or configured) one."""
    d = models_dir(storage)
    f = d / ACTIVE
    if not f.is_file():
        return None
    try:
        name = str(json.loads(f.read_text())["model"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable: counting with the configured model", f)
        return None
    path = (d / name).resolve()
    if path.parent != d.resolve() or not path.is_file():
        log.warning("%s names %r, not a model in %s: counting with the configured model", f, name, d)
        return None
    return path


def set_active(storage: str | Path, model: str | Path | None, by: str) -> Path | None:
    """Make ``model`` (a file in the models folder) active, or go back to the shipped one (None)."""
    from bmc.card import ModelCardError
    from bmc.edge_app.backends import BackendError
    from bmc.edge_app.classifier import CellClassifier

    d = models_dir(storage)
    f = d / ACTIVE
    if model is None:
        f.unlink(missing_ok=True)
        return None
    path = (d / Path(model).name).resolve()
    if path.parent != d.resolve() or not path.is_file():
        raise ActiveModelError(f"{Path(model).name}: not an adapted model in {d}")
    try:
        CellClassifier(path, threads=1)
    except (ModelCardError, BackendError) as e:
        raise ActiveModelError(f"{path.name} cannot be used: {e}") from e
    from bmc.edge_app.store import write_atomic

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_atomic(f, json.dumps({"model": path.name, "by": by, "time": stamp}) + "\n")  # its own temporary file
    return path

"""The device configuration file (TOML), typed, split by concern and validated on load.

An unknown section or key is an error that suggests the nearest known one; a value of the wrong
type is an error naming it. Defaults suit a USB microscope camera and May-Grünwald-Giemsa /
Wright stains. ``edge_app/deploy/bmc.toml`` is the annotated example the installer copies.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS, ORIENTATIONS
from bmc.errors import BmcError

try:
    import tomllib
except ImportError:  # Python 3.10 (Ubuntu 22.04 on a Jetson)
    import tomli as tomllib  # type: ignore[no-redef,unused-ignore]

from bmc.edge_app.detect import FinderConfig
from bmc.edge_app.differential import ReviewPolicy


class ConfigError(BmcError, ValueError):
    pass


def _range(lo: float, hi: float) -> dict[str, Any]:
    """Field metadata: the closed range a number must lie in."""
    return {"range": (lo, hi)}


def _choice(*values: object) -> dict[str, Any]:
    return {"choices": values}


@dataclasses.dataclass
class CameraConfig:
    source: str = "0"
    width: int | None = dataclasses.field(default=None, metadata=_range(16, 16384))
    height: int | None = dataclasses.field(default=None, metadata=_range(16, 16384))
    fps: float | None = dataclasses.field(default=None, metadata=_range(0.1, 1000))
    fourcc: str | None = dataclasses.field(default=None, metadata={"length": 4})


@dataclasses.dataclass
class ModelConfig:
    path: str = ""  # empty: the shipped int8 model
    threads: int = dataclasses.field(default=0, metadata=_range(0, 256))  # 0: all cores
    # 1, 2, 4 or 8 views of each cell, probabilities averaged
    orientations: int = dataclasses.field(default=DEFAULT_ORIENTATIONS, metadata=_choice(*ORIENTATIONS))
    white_balance: bool = False  # onto the model's training lamp (card 'lamp'); an experiment
    # which runtime runs the model: "litert" or "onnxruntime", that one's file (NAME_int8.tflite,
    # NAME_onnx-int8.onnx); "auto", the faster on this device of the two where both sit side by side
    # at equal held-out accuracy and on the same unknown-cell reference, and both are installed.
    # LiteRT by default: at another microscope (BCCD) the ONNX int8 file of the shipped model called
    # eosinophils right 70% of the time against 82-83% for the float and TFLite int8 files, although
    # all are equal on the training laboratory's held-out cells (benchmarks/README.md, "Runtime peers")
    runtime: str = dataclasses.field(default="litert", metadata=_choice("auto", "litert", "onnxruntime"))


@dataclasses.dataclass
class SessionDefaults:
    mode: str = dataclasses.field(default="field", metadata=_choice("field", "cell"))
    target: int = dataclasses.field(default=0, metadata=_range(0, 1_000_000))  # 0: no target
    # 0: measured from the cells found
    cell_diameter_px: float = dataclasses.field(default=0.0, metadata=_range(0, 4000))
    save_crops: bool = True
    print_every_s: float = dataclasses.field(default=30.0, metadata=_range(0.5, 86400))
    # what is counted: "blood" (per 100 leukocytes) or "marrow" (per 100 nucleated cells, M:E);
    # "" takes the model card's
    specimen: str = dataclasses.field(default="", metadata=_choice("", "blood", "marrow"))


@dataclasses.dataclass
class StorageConfig:
    folder: str = "/var/lib/bmc/sessions"
    # rotate exported sessions beyond this
    max_disk_percent: float = dataclasses.field(default=90.0, metadata=_range(10, 99))
    min_free_mb: float = dataclasses.field(default=200.0, metadata=_range(0, 1e7))


RESERVED_KEYS = ("Enter", "x", "b")  # the model's call, not a cell, undo


@dataclasses.dataclass
class ScreenConfig:
    # the review keys a technician is used to: class name -> one key (e.g. { segmented = "s",
    # lymphocyte = "l" }); classes not named here take the free digits 1-9 in the model's order
    keys: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for label, key in self.keys.items():
            if not isinstance(key, str) or len(key) != 1 or key in RESERVED_KEYS or key.isspace():
                raise ValueError(
                    f"keys.{label} must be one character other than {', '.join(RESERVED_KEYS)}, got {key!r}"
                )
            if key in seen:
                raise ValueError(f"keys.{label} and keys.{seen[key]} both use {key!r}")
            seen[key] = label


@dataclasses.dataclass
class DeviceConfig:
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    session: SessionDefaults = dataclasses.field(default_factory=SessionDefaults)
    finder: FinderConfig = dataclasses.field(default_factory=FinderConfig)
    review: ReviewPolicy = dataclasses.field(default_factory=ReviewPolicy)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    screen: ScreenConfig = dataclasses.field(default_factory=ScreenConfig)


# ranges of the settings that live in other modules' dataclasses
_EXTERNAL = {
    ("review", "min_confidence"): _range(0, 1),
    ("review", "min_margin"): _range(0, 1),
    ("review", "unknown_level"): _range(0, 0.999),
    ("finder", "cell_margin"): _range(1, 4),
    ("finder", "max_cells"): _range(1, 10_000),
    ("finder", "reference_red_cell_px"): _range(4, 4000),
    ("finder", "red_cell_px"): _range(0, 4000),
    ("finder", "red_cell_chroma"): _range(0, 150),
}


def _check(where: str, key: str, kind: Any, value: Any, meta: dict[str, Any]) -> Any:
    """``value`` as the setting ``[where] key`` of type ``kind`` stores it, or :class:`ConfigError`
    naming the key, the value and what it must be."""
    optional = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    if optional:
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        kind = kinds[0]
    if typing.get_origin(kind) is dict:  # a table of its own ([screen] keys = { neutrophil = "n" })
        k_kind, v_kind = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f'[{where}] {key} must be a table, e.g. {{ neutrophil = "n" }}, got {value!r}')
        for k, v in value.items():
            if not isinstance(k, k_kind) or not isinstance(v, v_kind):
                raise ConfigError(f"[{where}] {key}.{k} must be a {v_kind.__name__}, got {v!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"[{where}] {key} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"[{where}] {key} must be a finite number, got {value!r}")
    if "range" in meta:
        lo, hi = meta["range"]
        if not lo <= value <= hi:
            raise ConfigError(f"[{where}] {key} must be between {lo:g} and {hi:g}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"[{where}] {key} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
    if "length" in meta and len(value) != meta["length"]:
        raise ConfigError(f"[{where}] {key} must be {meta['length']} characters (e.g. 'MJPG'), got {value!r}")
    return value


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{key}' in [{where}]{hint}")
        if dataclasses.is_dataclass(hints[key]):
            value = _build(hints[key], value, f"{where}.{key}")
        else:
            meta = {**fields[key].metadata, **_EXTERNAL.get((where, key), {})}
            value = _check(where, key, hints[key], value, meta)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from e


# where the installer puts the device's configuration (edge_app/deploy/install.sh)
DEVICE_CONFIG = Path("/etc/bmc/bmc.toml")


def user_storage() -> Path:
    """The folder of session folders for someone who runs the screen without a device config: the
    per-user data folder of the XDG base-directory convention."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bmc" / "sessions"


def load(path: str | Path) -> DeviceConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    sections = {f.name: f for f in dataclasses.fields(DeviceConfig)}
    kwargs = {}
    for name, value in data.items():
        if name not in sections:
            near = difflib.get_close_matches(name, list(sections), n=1)
            raise ConfigError(
                f"{path}: unknown section [{name}]"
                + (f"; did you mean [{near[0]}]?" if near else f"; known: {', '.join(sections)}")
            )
        try:
            kwargs[name] = _build(type(getattr(DeviceConfig(), name)), value, name)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    cfg = DeviceConfig(**kwargs)
    if cfg.model.path and not Path(cfg.model.path).is_file():  # said here, where it was written
        raise ConfigError(f"{path}: [model] path {cfg.model.path!r}: no such model file")
    return cfg

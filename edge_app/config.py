"""The device configuration file (TOML), typed, split by concern and validated on load.

An unknown section or key is an error that suggests the nearest known one; a value of the wrong
type is an error naming it. Defaults suit a USB microscope camera and May-Grünwald-Giemsa /
Wright stains. ``edge_app/deploy/bmc.toml`` is the annotated example the installer copies.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (Ubuntu 22.04 on a Jetson)
    import tomli as tomllib  # type: ignore[no-redef]

from edge_app.detect import FinderConfig
from edge_app.differential import ReviewPolicy


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class CameraConfig:
    source: str = "0"
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    fourcc: str | None = None


@dataclasses.dataclass
class ModelConfig:
    path: str = ""  # empty: the shipped int8 model
    threads: int = 0  # 0: all cores
    orientations: int = 4  # 1, 2, 4 or 8 views of each cell, probabilities averaged
    white_balance: bool = False  # onto the model's training lamp (card 'lamp'); an experiment


@dataclasses.dataclass
class SessionSettings:
    mode: str = "field"
    target: int = 0  # 0: no target
    cell_diameter_px: float = 0.0  # 0: measured from the cells found
    save_crops: bool = True
    print_every_s: float = 30.0


@dataclasses.dataclass
class StorageConfig:
    folder: str = "/var/lib/bmc/sessions"
    max_disk_percent: float = 90.0  # rotate exported sessions beyond this
    min_free_mb: float = 200.0


@dataclasses.dataclass
class DeviceConfig:
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    session: SessionSettings = dataclasses.field(default_factory=SessionSettings)
    finder: FinderConfig = dataclasses.field(default_factory=FinderConfig)
    review: ReviewPolicy = dataclasses.field(default_factory=ReviewPolicy)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{key}' in [{where}]{hint}")
        default = getattr(cls(), key) if not dataclasses.is_dataclass(fields[key].default) else None
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value, f"{where}.{key}")
        elif default is not None and not isinstance(value, type(default)) and not (
                isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"[{where}] {key} must be a {type(default).__name__}, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from e


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
            raise ConfigError(f"{path}: unknown section [{name}]" + (f"; did you mean [{near[0]}]?" if near else
                                                                      f"; known: {', '.join(sections)}"))
        kwargs[name] = _build(type(getattr(DeviceConfig(), name)), value, name)
    cfg = DeviceConfig(**kwargs)
    if cfg.session.mode not in ("field", "cell"):
        raise ConfigError(f"{path}: [session] mode must be 'field' or 'cell', got {cfg.session.mode!r}")
    if cfg.model.orientations not in (1, 2, 4, 8):
        raise ConfigError(f"{path}: [model] orientations must be 1, 2, 4 or 8, got {cfg.model.orientations}")
    if not 10 <= cfg.storage.max_disk_percent <= 99:
        raise ConfigError(f"{path}: [storage] max_disk_percent must be between 10 and 99")
    return cfg

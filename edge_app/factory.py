"""One way to set up a count: the classifier and the session settings of a device configuration.

``bmc edge run``, ``bmc edge serve`` and the screen's Live page all start counts; each calls
:func:`classifier` and :func:`session_config` here, so that the model, its threads and
orientations, and every session setting are read from :mod:`bmc.edge_app.config` the same way (the
command line's own flags are a :class:`~bmc.edge_app.config.ModelConfig` and overrides).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bmc.edge_app.config import DeviceConfig, ModelConfig

if TYPE_CHECKING:
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.session import SessionConfig


def model_file(model: ModelConfig, path: str | Path | None = None) -> Path:
    """The model file a count runs: ``path`` (a model a person made active, a flag) as it is; else
    ``model.path`` or the shipped model, on the runtime :func:`choose_runtime` picks for this device
    (``[model] runtime``, or the environment's ``BMC_RUNTIME``)."""
    from bmc.edge_app.classifier import DEFAULT_MODEL

    if path:
        return Path(path)
    runtime = os.environ.get("BMC_RUNTIME") or model.runtime
    return choose_runtime(Path(model.path or DEFAULT_MODEL), runtime, model.threads or os.cpu_count()).path


def recording_model(sessions: list[Path]) -> Path | None:
    """The shipped model's file, for either runtime, that recorded ``sessions`` (by the sha256 each
    session recorded), or None: the base a laboratory adapts is the file its cells came from."""
    from bmc.card import sha256_file
    from bmc.edge_app import sessiondb
    from bmc.edge_app.classifier import DEFAULT_MODEL

    recorded = set()
    for folder in sessions:
        try:
            db = sessiondb.connect(folder)
            try:
                recorded |= {s.model_sha256 for s in sessiondb.sessions(db)}
            finally:
                db.close()
        except (FileNotFoundError, sqlite3.DatabaseError):
            continue  # not a session folder, or an unreadable one: adapting says which, in one line
    for candidate in (DEFAULT_MODEL, peer_file(DEFAULT_MODEL)):
        if candidate.is_file() and sha256_file(candidate) in recorded:
            return candidate
    return None


def classifier(model: ModelConfig, path: str | Path | None = None) -> CellClassifier:
    """The classifier ``model`` describes, on the file :func:`model_file` picks. Threads 0 means
    every core."""
    from bmc.edge_app.classifier import CellClassifier

    return CellClassifier(
        model_file(model, path),
        threads=model.threads or os.cpu_count(),
        orientations=model.orientations,
    )


def session_config(cfg: DeviceConfig, **overrides: Any) -> SessionConfig:
    """The session settings of a device configuration, for a count nobody watches in a window
    (the service, the screen); ``overrides``: fields of :class:`bmc.edge_app.session.SessionConfig`."""
    from bmc.edge_app.session import SessionConfig

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


# -- which runtime runs the model ------------------------------------------------------------------

#: how much lower (points) a peer file's held-out accuracy may be and still count as equal
EQUAL_ACCURACY_POINTS = 0.5


def peer_file(path: Path) -> Path:
    """The same model converted for the other runtime, named as ``bmc convert`` and ``bmc
    convert-onnx`` name them: ``NAME_int8.tflite`` beside ``NAME_onnx-int8.onnx``."""
    stem = path.stem.removesuffix("_onnx-int8").removesuffix("_int8")
    return path.with_name(f"{stem}_onnx-int8.onnx" if path.suffix == ".tflite" else f"{stem}_int8.tflite")


@dataclasses.dataclass(frozen=True)
class RuntimeChoice:
    """Which file (and so which runtime) counts, and why: what a device's doctor says."""

    path: Path
    why: str
    ms_per_cell: dict[str, float] = dataclasses.field(default_factory=dict)


def choose_runtime(path: Path, runtime: str = "auto", threads: int | None = None) -> RuntimeChoice:
    """The model file to count with: ``path`` itself, or with ``runtime = "auto"`` its peer for the
    other runtime where that is installed, sits beside it, kept the float model's accuracy as well
    (within :data:`EQUAL_ACCURACY_POINTS`) and is faster on this device. The timing is measured once
    per device and pair of files (one cell at a time, as a session classifies) and kept in the cache
    folder, so that every later start, and a resumed session, takes the same file."""
    from bmc.edge_app import backends

    if runtime != "auto":
        want = {v: k for k, v in backends.BY_SUFFIX.items()}[runtime]
        if path.suffix == want:
            return RuntimeChoice(path, f"{runtime}, as configured")
        other = peer_file(path)
        if not other.is_file():
            raise backends.BackendError(
                f"[model] runtime = {runtime!r}, but {other.name} is not beside {path.name}: convert it "
                f"({'bmc convert-onnx' if runtime == 'onnxruntime' else 'bmc convert'}) or set runtime = 'auto'"
            )
        return RuntimeChoice(other, f"{runtime}, as configured")
    other = peer_file(path)
    mine = backends.for_file(str(path))
    if not other.is_file():
        return RuntimeChoice(path, f"{mine}: no {other.name} beside it for the other runtime")
    theirs = backends.for_file(str(other))
    if theirs not in backends.available():
        return RuntimeChoice(path, f"{mine}: {theirs} is not installed (pip install '.[{backends.EXTRA[theirs]}]')")
    equal, why = _equal_accuracy(path, other)
    if not equal:
        return RuntimeChoice(path, f"{mine}: {why}")
    ms = time_pair(path, other, threads)
    fast = min(ms, key=ms.__getitem__)
    chosen = path if fast == path.name else other
    times = ", ".join(f"{backends.for_file(n)} {t:.2f} ms" for n, t in ms.items())
    return RuntimeChoice(
        chosen,
        f"{backends.for_file(fast)}: the faster here at equal accuracy ({times} per cell; {why})",
        ms,
    )


def _equal_accuracy(path: Path, other: Path) -> tuple[bool, str]:
    """Whether the two files count alike: equal held-out accuracy, and the same reference cells for
    the unknown-cell check (a guard set drawn from another split sets aside other cells at another
    microscope: benchmarks/README.md, "Runtime peers")."""
    import numpy as np

    from bmc.card import ModelCardError, file_beside, load_card

    try:
        cards = {p.name: load_card(p, require_deployable=True)[0] for p in (path, other)}
        acc = {n: float(c.validation.get("accuracy", "nan")) for n, c in cards.items()}
        guards = {
            n: None if not c.guard else tuple(np.load(file_beside(p, c.guard, "guard set"))["files"].tolist())
            for (n, c), p in zip(cards.items(), (path, other))
        }
    except (ModelCardError, OSError, KeyError, TypeError, ValueError) as e:
        return False, f"the other runtime's file is not usable ({e})"
    a, b = acc[path.name], acc[other.name]
    if not (abs(a - b) * 100 <= EQUAL_ACCURACY_POINTS):
        return False, f"held-out accuracy {a:.4f} against {b:.4f} for {other.name}: not equal"
    if guards[path.name] != guards[other.name]:
        return False, (
            f"{other.name}'s unknown-cell check rests on other reference cells than {path.name}'s (its guard "
            "set was drawn from another split): rebuild it from the model's own split"
        )
    return True, f"held-out accuracy {a:.4f} and {b:.4f}, the same reference cells"


def time_pair(path: Path, other: Path, threads: int | None) -> dict[str, float]:
    """Milliseconds per cell of each file on this device: from the cache, else measured now (and kept)."""
    import hashlib
    import json
    import platform
    import time

    import numpy as np

    from bmc.card import sha256_file
    from bmc.edge_app.classifier import CellClassifier

    key = hashlib.sha256(
        "|".join([sha256_file(path), sha256_file(other), platform.node(), platform.machine(), str(threads)]).encode()
    ).hexdigest()[:16]
    cache = runtime_cache() / f"runtime-{key}.json"
    try:
        found = json.loads(cache.read_text())
        if set(found) == {path.name, other.name}:
            return {k: float(v) for k, v in found.items()}
    except (OSError, ValueError, TypeError):
        pass
    clfs = [CellClassifier(p, threads=threads, orientations=1) for p in (path, other)]
    x = np.random.default_rng(0).uniform(0, 255, (1, *clfs[0].backend.input_shape[1:])).astype(np.float32)
    for clf in clfs:
        for _ in range(5):  # warm up
            clf.backend.predict(x)
    # interleaved rounds, the median of each: a load that comes and goes on the device weighs on both alike
    rounds: dict[str, list[float]] = {p.name: [] for p in (path, other)}
    for _ in range(7):
        for clf in clfs:
            t0 = time.perf_counter()
            for _ in range(10):
                clf.backend.predict(x)
            rounds[clf.path.name].append((time.perf_counter() - t0) / 10 * 1000)
    ms = {name: float(np.median(t)) for name, t in rounds.items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(ms))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: measured again at the next start
    return ms


def runtime_cache() -> Path:
    """Where the runtime timings of this device are kept (``BMC_CACHE``, else ``~/.cache/bmc``)."""
    return Path(os.environ.get("BMC_CACHE") or Path.home() / ".cache" / "bmc")

"""Service mode, storage rotation, export and the device check (``bmc edge serve/export/doctor``).

``serve`` runs differential sessions back to back from the configured camera, each into its own
time-stamped folder under the storage folder, waiting for the camera when it is absent. Before
each session, when the disk is fuller than ``max_disk_percent`` (or has less than
``min_free_mb``), the oldest sessions that have been *exported* are removed; a session that has
not been exported is never deleted — recording stops with a clear message instead.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bmc.edge_app import sessiondb

if TYPE_CHECKING:
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.config import DeviceConfig
    from bmc.edge_app.session import EdgeSession

EXPORTED_MARK = ".exported"


def session_dirs(storage: str | Path) -> list[Path]:
    root = Path(storage)
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "session.sqlite").exists()) if root.is_dir() else []


def is_exported(session: Path) -> bool:
    return (session / EXPORTED_MARK).exists()


def disk_usage(path: str | Path) -> tuple[float, float]:
    """(percent used, MB free) of the filesystem holding ``path``."""
    u = shutil.disk_usage(path)
    return 100.0 * (u.total - u.free) / u.total, u.free / 1e6


def rotate(
    storage: str | Path,
    max_percent: float,
    min_free_mb: float,
    usage: Callable[[str | Path], tuple[float, float]] = disk_usage,
) -> list[Path]:
    """Remove the oldest exported sessions until the disk is below the limits; returns them."""
    removed = []
    for s in session_dirs(storage):
        pct, free = usage(storage)
        if pct <= max_percent and free >= min_free_mb:
            break
        if is_exported(s):
            from bmc.edge_app.folder_lock import outputs

            with outputs(s):  # not while its files are rewritten or it is exported again
                shutil.rmtree(s)
            removed.append(s)
    return removed


def export(session: str | Path, dest: str | Path) -> Path:
    """Copy a finished session (CSV, HTML report, FHIR DiagnosticReport, crops, database) to ``dest``
    (a USB stick). Each export goes through its own temporary folder on the stick. The folder's
    outputs lock is held only while its derived files are written and copied with the database, and
    again while the copy takes its name and the folder is marked exported (only once the copy stands
    whole): the crops, the slow part, are copied without it, so decisions on the screen meanwhile
    do not wait for the stick."""
    from bmc.edge_app import fhir
    from bmc.edge_app.folder_lock import outputs
    from bmc.edge_app.report import write_session_files

    session, dest = Path(session), Path(dest)
    if not (session / "session.sqlite").exists():
        raise FileNotFoundError(f"{session}: not a session folder (no session.sqlite)")
    if not dest.is_dir():
        raise FileNotFoundError(f"{dest}: export destination not found (is the USB stick mounted?)")
    files = ("cells.csv", "differential.csv", "report.html", "differential.fhir.json")
    target = dest / session.name
    tmp = Path(tempfile.mkdtemp(prefix=f"{session.name}.partial-", dir=dest))
    try:
        os.chmod(tmp, stat.S_IMODE(session.stat().st_mode))  # the session folder's mode, not mkdtemp's 0700
        with outputs(session):  # one moment's files and database, together
            write_session_files(session)  # the FHIR document too, where one was written before
            if not (session / "differential.fhir.json").exists():
                fhir.write(session)
            # a consistent copy of the database even if a writer is attached: SQLite's online backup
            sessiondb.backup(session, tmp / sessiondb.DB_NAME)
            for name in files:
                shutil.copy2(session / name, tmp / name)
        if (session / "crops").is_dir():  # written once each, never changed: no lock needed
            shutil.copytree(session / "crops", tmp / "crops")
        os.sync()
        with outputs(session):  # two exports of one folder: one takes the name at a time
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f"{session.name}.old-", dir=dest))
                target.rename(old / session.name)  # the earlier copy stands aside until this one is in place
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
            missing = [n for n in (sessiondb.DB_NAME, *files) if not (target / n).is_file()]
            if missing:
                raise OSError(f"{target}: the copy is missing {', '.join(missing)}; the session is not marked exported")
            os.sync()
            stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
            (session / EXPORTED_MARK).write_text(f"{stamp} {target}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def new_session_folder(storage: Path) -> Path:
    """A time-stamped folder name under ``storage`` that no session uses yet (two sessions started
    within one second each get their own)."""
    name = stem = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    k = 1
    while (storage / name).exists():
        name = f"{stem}_{k}"
        k += 1
    return storage / name


def serve(cfg: DeviceConfig, echo: Callable[[str], None] = print, max_sessions: int | None = None) -> None:
    """Run sessions from the configured camera until stopped (systemd restarts on failure)."""
    storage = Path(cfg.storage.folder)
    storage.mkdir(parents=True, exist_ok=True)
    # SIGTERM and SIGINT stop the service in every state: during a session (its own handler closes
    # it after the frame in flight), between sessions, and while it waits for the camera or for space
    stop = threading.Event()
    current: list[EdgeSession | None] = [None]

    def on_signal(signum: int, _frame: object) -> None:
        echo(f"received signal {signum}: stopping the service")
        stop.set()
        if current[0] is not None:
            current[0].stop()

    old = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    try:
        _serve_loop(cfg, storage, echo, max_sessions, stop, current)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _serve_loop(
    cfg: DeviceConfig,
    storage: Path,
    echo: Callable[[str], None],
    max_sessions: int | None,
    stop: threading.Event,
    current: list[EdgeSession | None],
) -> None:
    from bmc.edge_app.active import active_model
    from bmc.edge_app.factory import classifier, model_file, session_config
    from bmc.edge_app.session import EdgeSession
    from bmc.edge_app.sources import SourceError, open_source

    clf = None
    done = 0
    while (max_sessions is None or done < max_sessions) and not stop.is_set():
        # the model a person made active on the screen, else the configured one: read before each session
        want = model_file(cfg.model, active_model(storage))
        if clf is None or clf.path != want:
            clf = classifier(cfg.model, want)
            echo(f"counting with {clf.description}")
        removed = rotate(storage, cfg.storage.max_disk_percent, cfg.storage.min_free_mb)
        for gone in removed:
            echo(f"removed exported session {gone.name} to free space")
        pct, free = disk_usage(storage)
        if pct > cfg.storage.max_disk_percent or free < cfg.storage.min_free_mb:
            echo(
                f"error: storage {storage} is {pct:.0f}% full ({free:.0f} MB free) and every session on it is "
                "unexported: export sessions (bmc edge export) before recording more"
            )
            stop.wait(60)
            continue
        try:
            source = open_source(
                cfg.camera.source,
                width=cfg.camera.width,
                height=cfg.camera.height,
                fps=cfg.camera.fps,
                fourcc=cfg.camera.fourcc,
            )
        except SourceError as e:
            echo(f"waiting for the camera: {e}")
            stop.wait(5)
            continue
        folder = new_session_folder(storage)
        echo(f"session {folder.name} started")
        session = EdgeSession(source, clf, folder, session_config(cfg), echo=echo)
        current[0] = session
        if stop.is_set():  # a signal while it was being set up
            session.stop()
        r = session.run()
        current[0] = None
        done += 1
        # a signal the session took as it was closing (it ended on its target all the same) is the
        # service's too: its handler was the one installed then
        if r.status == "stopped" or session.stopping:
            return


Check = tuple[list[str], list[str]]  # (what the device has, what is wrong)


def _machine() -> Check:
    import platform

    return [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    ], []


def _runtime() -> Check:
    try:
        from importlib import metadata

        from bmc.edge_app.backends.litert import RUNTIME

        have = [f"runtime: {RUNTIME} {metadata.version(RUNTIME)}"]
    except Exception as e:  # noqa: BLE001
        return [], [f"no LiteRT runtime: {e}; pip install '.[edge]' from the bmc checkout"]
    try:  # the optional second runtime, for .onnx models (bmc-edge[onnx])
        from bmc.edge_app.backends.onnxrt import RUNTIME as ORT
        from bmc.edge_app.backends.onnxrt import providers

        have.append(f"runtime: {ORT} (providers: {', '.join(providers())})")
    except ImportError:
        pass
    return have, []


def _opencv() -> Check:
    try:
        import cv2

        from bmc.edge_app.sources.camera import has_gstreamer

        return [f"OpenCV {cv2.__version__} (GStreamer: {'yes' if has_gstreamer() else 'no'})"], []
    except ImportError as e:
        return [], [f"no OpenCV: {e}"]


def _packages_and_cameras() -> Check:
    import importlib.util

    have = ["TensorFlow is installed (not needed on the device)"] if importlib.util.find_spec("tensorflow") else []
    cams = sorted(glob.glob("/dev/v4l/by-id/*")) or sorted(glob.glob("/dev/video*"))
    have.append("cameras: " + (", ".join(cams) if cams else "none found under /dev/v4l/by-id or /dev/video*"))
    have.append(
        "Picamera2: "
        + (
            "available"
            if importlib.util.find_spec("picamera2")
            else "not installed (only needed for the Raspberry Pi camera)"
        )
    )
    return have, []


def _model(cfg: DeviceConfig | None, model_path: str | None) -> Check:
    from bmc.card import ModelCardError
    from bmc.edge_app.backends import BackendError
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.config import ModelConfig
    from bmc.edge_app.factory import choose_runtime

    choice = None
    try:
        if model_path:
            model = Path(model_path)
        else:  # the device's own model, on the runtime a count takes (factory.model_file)
            base = Path(cfg.model.path) if cfg and cfg.model.path else DEFAULT_MODEL
            runtime = os.environ.get("BMC_RUNTIME") or (cfg.model if cfg else ModelConfig()).runtime
            choice = choose_runtime(base, runtime, clf_threads())
            model = choice.path
        clf = CellClassifier(model, threads=1)  # the card, the outputs against it, an adapted model's head
    except (ModelCardError, BackendError) as e:
        return [], [f"model: {e}"]
    card, v = clf.card, clf.card.validation
    have = [
        f"model: {clf.description} ({card.variant}, {len(clf.contract.labels)} classes, validated "
        + (
            f"accuracy {v['accuracy']:.3f}" + (f" on {v['n']} held-out images)" if v.get("n") else ")")
            if "accuracy" in v
            else f"by cross-validation on this laboratory's reviewed cells, balanced accuracy "
            f"{v.get('balanced_accuracy', float('nan')):.3f} against the shipped head's "
            f"{v.get('shipped_balanced_accuracy', float('nan')):.3f})"
        )
    ]
    have.append(f"  runs on: {clf.backend.description}")
    if choice is not None:
        have.append(f"  runtime chosen: {choice.why}")
    if clf.head is not None:
        a = card.adaptation
        have.append(
            f"  adapted from {(card.base_model or {}).get('file', '?')} on {a.get('date', '?')} with "
            f"{a.get('cells', '?')} reviewed cells by {', '.join(a.get('reviewers', [])) or '?'}"
        )
    adaptable = clf.has_embedding and card.guard
    have.append(
        "  adaptable on this device: "
        + ("yes (embedding output and guard set)" if adaptable else "no (no embedding or guard set)")
    )
    if choice is None or not choice.ms_per_cell:  # not timed for the choice: timed here, for whoever sets it up
        have += _peer(clf)
    return have, []


def _peer(clf: CellClassifier) -> list[str]:
    """The same model for the other runtime, where it sits beside this one and that runtime is
    installed: both timed here, on this device, one cell at a time (as ``[model] runtime = "auto"``
    times them), so that whoever sets the device up sees which is faster; both passed the same
    conversion gate."""
    from bmc.card import ModelCardError
    from bmc.edge_app.backends import BackendError, available, for_file
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.factory import peer_file, time_pair

    other = peer_file(clf.path)
    if clf.head is not None or not other.is_file() or "onnxruntime" not in available():
        return []
    try:
        peer = CellClassifier(other, threads=clf_threads(), orientations=1)
    except (ModelCardError, BackendError) as e:
        return [f"  {other.name}: not usable ({e})"]
    ms = time_pair(clf.path, other, clf_threads())
    fast = min(ms, key=ms.__getitem__)
    acc = {c.path.name: c.card.validation.get("accuracy") for c in (clf, peer)}
    return [
        "  the same model for the other runtime: "
        + ", ".join(f"{n} {t:.1f} ms per cell (held-out accuracy {acc[n]:.4f})" for n, t in ms.items())
        + f"; faster here: {fast}"
        + ("" if fast == clf.path.name else f' (select it with [model] runtime = "{for_file(fast)}")')
    ]


def clf_threads() -> int:
    return os.cpu_count() or 1


def _camera_and_storage(cfg: DeviceConfig) -> Check:
    have: list[str] = []
    wrong: list[str] = []
    src = cfg.camera.source
    if src.startswith("/dev/") and not os.path.exists(src):
        wrong.append(f"camera {src} is not present (plugged in? see /dev/v4l/by-id/)")
    storage = Path(cfg.storage.folder)
    probe = storage if storage.exists() else storage.parent
    if not probe.exists():
        return have, wrong + [f"storage folder {storage} and its parent do not exist"]
    pct, free = disk_usage(probe)
    sessions = session_dirs(storage)
    have.append(
        f"storage: {storage} — {pct:.0f}% used, {free:.0f} MB free, "
        f"{len(sessions)} sessions ({sum(not is_exported(s) for s in sessions)} not exported)"
    )
    if pct > cfg.storage.max_disk_percent:
        wrong.append(f"storage {storage} is above its {cfg.storage.max_disk_percent:.0f}% limit")
    if not os.access(probe, os.W_OK):
        wrong.append(f"storage {probe} is not writable by this user")
    return have, wrong


def _meters_and_display() -> Check:
    from bmc.edge_app.meters import find_meters
    from bmc.edge_app.session import has_display, opencv_gui

    meters = find_meters()
    have = ["power meters: " + (", ".join(m.name for m in meters) if meters else "none")]
    screen, gui = has_display(), opencv_gui()
    have.append(
        "display: "
        + ("yes" if screen else "none (headless)")
        + "; OpenCV window toolkit: "
        + (gui or "none (headless build)")
    )
    if screen and not gui:
        have.append("  (a screen is attached but this OpenCV cannot open the live window: install.sh --screen)")
    return have, []


def doctor(cfg: DeviceConfig | None = None, config_path: str | None = None, model_path: str | None = None) -> Check:
    """(what the device has, what is wrong) — for ``bmc edge doctor``: one check after another."""
    checks = [_machine(), _runtime(), _opencv(), _packages_and_cameras(), _model(cfg, model_path)]
    if cfg:
        checks.append(_camera_and_storage(cfg))
    checks.append(_meters_and_display())
    return [h for have, _ in checks for h in have], [w for _, wrong in checks for w in wrong]

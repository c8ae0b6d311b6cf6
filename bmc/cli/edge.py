"""``bmc edge``: on the device, find, classify and count cells, review, adapt, report (no TensorFlow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import click

from bmc.cli.common import CliFail, one_line_errors, orientations_option, threads_option, write_json
from bmc.edge_app.unknown import DEFAULT_LEVEL

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import FrameType
    from typing import TextIO

    from bmc.edge_app.session import SessionResult


@click.group()
def edge() -> None:
    """On the device: find, classify and count cells; report (no TensorFlow)."""


@edge.command("run")
@click.argument("source")
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="a .tflite (LiteRT) or .onnx (ONNX Runtime) with its model card (default: shipped int8)",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="session folder")
@click.option(
    "--mode",
    type=click.Choice(["field", "cell"]),
    default="field",
    show_default=True,
    help="field: find cells in each frame; cell: each frame is one centred cell",
)
@click.option("--target", type=click.IntRange(min=1), help="stop after this many counted cells (100, 200, 500 …)")
@threads_option
@click.option("--headless", is_flag=True, help="no window; print counts periodically")
@click.option("--max-frames", type=click.IntRange(min=1), help="stop after this many frames")
@click.option(
    "--cell-diameter", type=click.FloatRange(1, 4000), help="fixed cell diameter in pixels (default: measured)"
)
@click.option(
    "--new-session",
    is_flag=True,
    help="add a session to an --out folder that holds one (default: resume it if it was "
    "interrupted, else refuse: its report would count both)",
)
@click.option("--no-crops", is_flag=True, help="do not save a JPEG per cell")
@orientations_option(help="classify each cell in this many rotations / mirror images and average")
@click.option(
    "--white-balance",
    is_flag=True,
    help="white-balance the session onto the model's training lamp (an experiment: see benchmarks/README.md)",
)
@click.option(
    "--unknown-level",
    type=float,
    default=DEFAULT_LEVEL,
    show_default=True,
    help="set a cell aside as unknown beyond the distance this share of the training laboratory's "
    "validation cells keep (0.9-0.999; higher sets fewer aside; 0: off)",
)
@click.option(
    "--specimen",
    type=click.Choice(["blood", "marrow"]),
    help="blood: per 100 leukocytes, erythroblasts beside; marrow: per 100 nucleated cells with M:E "
    "(default: the model card's)",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="the device's bmc.toml: its [model], [session], [finder] and [review] settings, as the service and "
    "the screen count with them (an option given here overrides its setting)",
)
@click.pass_context
def edge_run(
    ctx: click.Context,
    source: str,
    model: str | None,
    out_dir: str,
    mode: str,
    target: int | None,
    threads: int | None,
    headless: bool,
    max_frames: int | None,
    cell_diameter: float | None,
    new_session: bool,
    no_crops: bool,
    orientations: str,
    white_balance: bool,
    unknown_level: float,
    specimen: str | None,
    config_path: str | None,
) -> None:
    """Classify and count the cells of SOURCE: a camera index or /dev path, picamera2, a GStreamer
    pipeline, a video, an image folder or glob, or one image."""
    from click.core import ParameterSource

    def given(name: str) -> bool:  # on the command line, not a default
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    from bmc.edge_app.backends import BackendError
    from bmc.edge_app.differential import ReviewPolicy
    from bmc.edge_app.session import SHORT, EdgeSession, SessionConfig, has_display

    try:
        ReviewPolicy(unknown_level=unknown_level)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--unknown-level") from None
    import dataclasses

    from bmc.edge_app import config as config_mod
    from bmc.edge_app.config import ModelConfig
    from bmc.edge_app.factory import classifier, session_config
    from bmc.edge_app.sources import SourceError
    from bmc.edge_app.store import SessionFolderError

    device = None
    if config_path:
        try:
            device = config_mod.load(config_path)
        except config_mod.ConfigError as e:
            raise CliFail(str(e)) from e

    session_target: list[int | None] = [target]  # the target the session counted to (the config's, or --target)

    def go() -> SessionResult:
        if device is None:
            models = ModelConfig(threads=threads or 0, orientations=int(orientations), white_balance=white_balance)
            cfg = SessionConfig(
                mode=mode,
                target=target,
                headless=headless or not has_display(),
                save_crops=not no_crops,
                cell_diameter_px=cell_diameter,
                max_frames=max_frames,
                white_balance=white_balance,
                on_existing="new" if new_session else "resume",
                review=ReviewPolicy(unknown_level=unknown_level),
                print_every_s=5.0,
                specimen=specimen,
            )  # a person watches
        else:  # the device's settings, what the command line says on top
            models = dataclasses.replace(
                device.model,
                threads=(threads or 0) if given("threads") else device.model.threads,
                orientations=int(orientations) if given("orientations") else device.model.orientations,
                white_balance=white_balance or device.model.white_balance,
            )
            review_policy = (
                dataclasses.replace(device.review, unknown_level=unknown_level)
                if given("unknown_level")
                else device.review
            )
            chosen = {
                "mode": mode if given("mode") else None,
                "target": target,
                "save_crops": False if no_crops else None,
                "cell_diameter_px": cell_diameter,
                "specimen": specimen,
            }
            cfg = session_config(
                device,
                headless=headless or not has_display(),
                max_frames=max_frames,
                on_existing="new" if new_session else "resume",
                review=review_policy,
                white_balance=models.white_balance,
                **{k: v for k, v in chosen.items() if v is not None},
            )
        # a model named on the command line runs as it is; none: the one made active on the device's
        # screen (as the service counts), else the configured or the shipped one
        from bmc.edge_app.active import active_model

        active = active_model(device.storage.folder) if device is not None and not model else None
        clf = classifier(models, model or active)
        session_target[0] = cfg.target
        return EdgeSession(source, clf, out_dir, cfg, echo=click.echo).run()

    try:
        r = one_line_errors(go)
    except (SourceError, BackendError, SessionFolderError) as e:
        raise CliFail(str(e)) from e
    if r.status == "disk-full":
        raise CliFail(r.message)
    if r.status == SHORT:  # a count short of its target is no differential to sign: a script must see it
        click.echo(
            f"warning: the source ended before the target of {session_target[0]} cells was reached; the count is "
            "short (status 'short of target', exit status 3)",
            err=True,
        )
        raise SystemExit(3)


@edge.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def edge_serve(config_path: str) -> None:
    """Service mode: sessions back to back from the configured camera (for systemd)."""
    from bmc.edge_app import config as config_mod
    from bmc.edge_app.service import serve

    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        raise CliFail(str(e)) from e
    one_line_errors(serve, cfg, echo=lambda m: click.echo(m, err=False))


@edge.command("ui")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="the device's bmc.toml: its storage folder and model",
)
@click.option("--storage", type=click.Path(file_okay=False), help="the folder of session folders (overrides --config)")
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="HOST:PORT; any host but loopback needs a password (--set-password) and a sign-in",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False),
    help="where the password hash lives (default: the --config file's folder, else ~/.config/bmc)",
)
@click.option("--set-password", is_flag=True, help="set the screen's password on this device, then stop")
@click.option("--by", "user", help="on loopback: who decides (default: the logged-in user)")
@click.option("--source", help="what the Live page records from (default: the config's [camera] source)")
@click.option(
    "--sign-in",
    "sign_in_local",
    is_flag=True,
    help="on loopback too, every person signs in with their name (technicians sharing the device's screen); "
    "needs the password set",
)
def edge_ui(
    config_path: str | None,
    storage: str | None,
    listen: str,
    config_dir: str | None,
    set_password: bool,
    user: str | None,
    source: str | None,
    sign_in_local: bool,
) -> None:
    """The technician's screen in a browser: sessions, differentials with their 95% limits, review
    by click or key, reports, the device check. Loopback only unless a password is set."""
    import os
    from pathlib import Path

    from bmc.edge_app import config as config_mod
    from bmc.edge_app.ui import auth

    if not config_path and not storage and config_mod.DEVICE_CONFIG.is_file():
        config_path = str(config_mod.DEVICE_CONFIG)  # the installed device's own configuration
        click.echo(f"device config: {config_path}")
    cfg = config_mod.load(config_path) if config_path else None
    cdir = (
        Path(config_dir)
        if config_dir
        else (Path(config_path).resolve().parent if config_path else Path.home() / ".config" / "bmc")
    )
    if set_password:
        pw = click.prompt("new password for the bmc screen", hide_input=True, confirmation_prompt=True)
        try:
            path = auth.set_password(cdir, pw)
        except auth.AuthError as e:
            raise CliFail(str(e)) from e
        click.echo(f"password hash written to {path} (readable by this user only)")
        return
    from bmc.edge_app.review import current_user
    from bmc.edge_app.ui.app import UiApp, is_loopback, serve

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise click.BadParameter(f"{listen!r}: HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--listen")
    if not 0 <= int(port) <= 65535:
        raise click.BadParameter(
            f"{listen!r}: port {port} is not a port (0 to 65535; 0: any free one)", param_hint="--listen"
        )
    folder = storage or (cfg.storage.folder if cfg else None)
    if not folder:  # no device config: this user's own folder, said so that the sessions can be found
        folder = str(config_mod.user_storage())
        os.makedirs(folder, exist_ok=True)
        click.echo(f"sessions are kept in {folder} (--storage FOLDER or --config bmc.toml for another)")
    if not os.path.isdir(folder):
        raise CliFail(f"{folder}: no such storage folder")
    sign_in = sign_in_local or not is_loopback(host)
    stored = auth.stored_hash(cdir)
    if sign_in and not stored:
        why = "signing in" if sign_in_local and is_loopback(host) else f"listening on {host} (beyond this computer)"
        raise CliFail(
            f"{why} needs a password: bmc edge ui --set-password" + (f" --config-dir {cdir}" if config_dir else "")
        )
    from bmc.edge_app.factory import session_config
    from bmc.edge_app.ui.live import LiveRunner

    model = (cfg.model.path or None) if cfg else None
    src = source or (cfg.camera.source if cfg else None)
    from bmc.edge_app.sources import is_camera

    if src and not is_camera(src) and not any(ch in src for ch in "*?[") and not os.path.exists(src):
        click.echo(f"warning: the Live page's source {src} does not exist: Start will say so until it does", err=True)
    live = None
    if src:
        cam = {k: getattr(cfg.camera, k) for k in ("width", "height", "fps", "fourcc")} if cfg and not source else {}
        live = LiveRunner(
            folder, src, model, session_config(cfg) if cfg else None, cam, model_config=cfg.model if cfg else None
        )
    app = UiApp(
        folder, stored, sign_in, user or current_user(), model=model, live=live, keys=cfg.screen.keys if cfg else None
    )
    if cfg is not None and cfg.screen.keys:  # a key for a class no model here has would be silently unused
        from bmc.edge_app.active import active_model
        from bmc.edge_app.classifier import CellClassifier
        from bmc.stages import STAGE_LABELS

        named = set(app.base_model().labels) | set(STAGE_LABELS)
        active = active_model(folder)
        if active is not None:
            named |= set(CellClassifier(active, threads=1).labels)
        unknown = sorted(set(cfg.screen.keys) - named)
        if unknown:
            raise CliFail(
                f"{config_path}: [screen] keys names {', '.join(map(repr, unknown))}, which no model here has "
                f"(its classes: {', '.join(sorted(named))})"
            )

    # systemd's stop: close a live session cleanly, then the server
    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, on_term)
    from bmc.edge_app.ui.app import UiError

    try:
        serve(app, host, int(port), echo=click.echo)
    except UiError as e:
        raise CliFail(str(e)) from e
    except KeyboardInterrupt:
        click.echo("stopping the screen")
    finally:
        if live is not None and live.running:
            live.stop()
            click.echo(f"live session {cast('Path', live.folder).name} closed: {live.state()['state']}")


@edge.command("export")
@click.argument("sessions", nargs=-1, type=click.Path(file_okay=False))
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False), help="USB stick or folder")
@click.option("--all-from", type=click.Path(file_okay=False), help="export every session under this storage folder")
def edge_export(sessions: tuple[str, ...], dest: str, all_from: str | None) -> None:
    """Copy finished sessions (CSV, HTML report, crops, database) to a USB stick or folder."""
    from bmc.edge_app.service import export, session_dirs

    todo: list[str | Path] = [*sessions, *(session_dirs(all_from) if all_from else [])]
    if not todo:
        raise CliFail("nothing to export: name session folders or --all-from STORAGE")
    for s in todo:
        click.echo(f"exported {s} → {one_line_errors(export, s, dest)}")


@edge.command("doctor")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    help="check this model (default: the config's [model] path, else the shipped one)",
)
def edge_doctor(config_path: str | None, model_path: str | None) -> None:
    """What this device has (runtime, cameras, model, disk, meters) and what is wrong."""
    from bmc.edge_app import config as config_mod
    from bmc.edge_app.service import doctor

    cfg = None
    problems = []
    if config_path:
        try:
            cfg = config_mod.load(config_path)
        except config_mod.ConfigError as e:
            problems.append(str(e))
    have, wrong = doctor(cfg, model_path=model_path)
    for line in have:
        click.echo(f"  {line}")
    for line in problems + wrong:
        click.echo(f"  PROBLEM: {line}")
    if problems or wrong:
        raise SystemExit(1)
    click.echo("  all good")


@edge.command("report")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--fhir",
    is_flag=True,
    help="also write differential.fhir.json: a FHIR R4 DiagnosticReport with "
    "LOINC-coded Observations, for a laboratory information system",
)
def edge_report(out_dir: str, fhir: bool) -> None:
    """Write OUT_DIR/report.html (counts, percentages, flagged cells, thumbnails) and cells.csv."""
    from bmc.edge_app.report import write_session_files

    paths = one_line_errors(write_session_files, out_dir)  # a FHIR file already there is rewritten with the rest
    if fhir and not any(p.name == "differential.fhir.json" for p in paths):
        from bmc.edge_app import fhir as fhir_mod

        paths.append(one_line_errors(fhir_mod.write, out_dir))
    for path in paths:
        click.echo(f"{'report' if path.name == 'report.html' else 'written'}: {path}")


@edge.command("adapt")
@click.argument("sessions", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder for the adapted model")
@click.option("--name", help="file-name stem of the adapted model (default: the base model's, dated)")
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="the base model the sessions were recorded with (default: the shipped int8)",
)
@click.option(
    "--max-guard-drop",
    default=3.0,
    show_default=True,
    help="refuse when the training classes' held-out accuracy drops more than this many points",
)
@click.option(
    "--grow",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="also take as known ground the cells the sessions counted with no person at least this sure "
    "(0.9, say; 0: off; measured to give no more cells counted unaided on BCCD: benchmarks/README.md)",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the validation as JSON")
def edge_adapt(
    sessions: tuple[str, ...],
    out_dir: str,
    name: str | None,
    model: str | None,
    max_guard_drop: float,
    grow: float,
    json_out: str | None,
) -> None:
    """Adapt the model to this microscope from the cells people reviewed in SESSIONS: a new class head
    fitted on the device (numpy, seconds), cross-validated against the shipped one and refused unless
    better. Writes OUT/NAME.tflite and its card; run it with bmc edge run --model (or [model] path)."""
    import datetime
    from pathlib import Path

    from bmc.edge_app import adapt
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.config import ModelConfig
    from bmc.edge_app.factory import model_file, recording_model

    s = adapt.Settings(max_guard_drop=max_guard_drop, grow_confidence=grow)
    # the base: the model named, else the shipped file (for LiteRT or ONNX Runtime) that recorded the sessions
    base = model or recording_model([Path(x) for x in sessions]) or model_file(ModelConfig())
    clf = one_line_errors(CellClassifier, base, orientations=1)
    stem = name or f"{clf.path.stem}_adapted_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    one_line_errors(adapt.free_target, out_dir, stem, clf)  # a name taken: said before any work
    guard, reviewed, r = one_line_errors(adapt.prepare, sessions, clf, s)
    click.echo(
        f"{len(reviewed.labels)} reviewed cells from {len(reviewed.sessions)} session folder(s) by "
        f"{', '.join(reviewed.reviewers)}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.cells_per_class.items()))
    )
    click.echo(r.table())
    written = adapt.model_to_write(r, reviewed, guard, clf, s)
    kept = written if written is not None and written.kept_shipped else None
    said: dict[str, Any] = {
        # "accepted": the adapted head's verdict; "model": the file written (None: nothing), and
        # "written" what it holds
        "accepted": r.accepted,
        "written": None,  # what is in "model": "adapted", or "shipped-head-lab-gates" (head_kept)
        "model": None,
        "reasons": r.reasons,
        "cells_per_class": r.cells_per_class,
        "cross_validation": r.cross_validation,
        "guard": r.guard,
        "seconds": r.seconds,
        "head_kept": kept is not None,
        "calibration": (written or r).calibration.to_dict() if (written or r).calibration else None,
    }
    if r.advice:
        click.echo("more reviewed cells would help: " + "; ".join(r.advice))
    if written is None:
        click.echo(r.gates())
        if json_out:
            write_json(json_out, said)
        raise CliFail(
            "adapted model refused, nothing written: "
            + "; ".join(r.reasons)
            + ". Review more cells (bmc edge review --for-adapt) and adapt again"
        )
    if kept is not None:
        click.echo(
            "adapted head refused: " + "; ".join(r.reasons) + ". The shipped head is kept unchanged, with the "
            "gates this laboratory's cells set (the reviewed cells it names rightly as known ground; the confidence "
            "rule, never looser than the device's, and the error below from its random sample, which the shipped "
            "head never learnt from):"
        )
    else:
        click.echo("adapted head accepted: better than the shipped one on held-out reviewed cells.")
    click.echo(written.gates())
    path = one_line_errors(adapt.write_model, written, reviewed, clf, guard, out_dir, stem, s)
    if json_out:
        write_json(json_out, {**said, "model": str(path), "written": "shipped-head-lab-gates" if kept else "adapted"})
    what = "the shipped head with this laboratory's gates" if kept is not None else "adapted"
    click.echo(f"{what}, in {written.seconds:.1f} s; count with it: bmc edge run SOURCE --model {path}")
    click.echo(str(path))


@edge.command("review")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--by", "reviewer", help="who decides (default: the logged-in user); recorded with each decision")
@click.option("--list", "list_only", is_flag=True, help="list the cells waiting for review and stop")
@click.option("--cell", "cell_id", type=int, help="decide one cell (its id in cells.csv) with --label, or --undo")
@click.option("--label", help="the class of --cell, or 'rejected' (not a countable cell)")
@click.option("--undo", is_flag=True, help="withdraw the latest decision on --cell")
@click.option(
    "--apply",
    "apply_file",
    type=click.Path(dir_okay=False),
    help="decisions from a CSV with columns id,label: the output of --list with its labels filled in",
)
@click.option(
    "--all",
    "include_counted",
    is_flag=True,
    help="in the window, go on to the cells the model counted, least confident first",
)
@click.option("--new-label", is_flag=True, help="allow a class the model does not know (e.g. blast)")
@click.option(
    "--for-adapt",
    is_flag=True,
    help="review to adapt the model: the cells that teach it most first (least sure, spread over the "
    "classes the session found), counted ones included",
)
@click.option("--per-class", type=click.IntRange(min=1), help="with --for-adapt: at most this many cells of each class")
@click.option(
    "--for-calibration",
    type=click.IntRange(min=1),
    help="with --list: the next N cells of the session's fixed random order, whatever the model said: "
    "reviewed from the top, they calibrate the gates at this microscope on adapting (60 or more)",
)
def edge_review(
    out_dir: str,
    reviewer: str | None,
    list_only: bool,
    cell_id: int | None,
    label: str | None,
    undo: bool,
    apply_file: str | None,
    include_counted: bool,
    new_label: bool,
    for_adapt: bool,
    per_class: int | None,
    for_calibration: int | None,
) -> None:
    """Review the cells OUT_DIR set aside: one by one in a window, or by --cell/--label or --apply;
    then rewrite cells.csv and report.html with the differential after review."""
    import sqlite3

    from bmc.edge_app import sessiondb
    from bmc.edge_app.report import write_session_files
    from bmc.edge_app.review import Reviewer, ReviewError, review_window, teaching_queue, write_decisions_template
    from bmc.edge_app.session import NO_GUI_HINT, has_display, opencv_gui

    if (label or undo) and cell_id is None:
        raise click.UsageError("--label and --undo need --cell ID")
    if cell_id is not None and bool(label) == bool(undo):
        raise click.UsageError("--cell needs --label L or --undo (one of them)")
    try:
        if list_only:  # a decisions file to fill in (the label column left empty), read-only
            n = write_decisions_template(
                out_dir,
                # click 8.5 deprecates get_text_stream behind a module __getattr__ that mypy reads as object
                cast("Callable[[str], TextIO]", click.get_text_stream)("stdout"),
                for_adapt,
                per_class,
                include_counted,
                for_calibration,
            )
            click.echo(f"{n} cells to review: fill in the label column and --apply the file", err=True)
            return
        with Reviewer(out_dir, reviewer, allow_new_labels=new_label, check=True) as r:
            if cell_id is not None:
                if undo:
                    r.undo(cell_id)
                    click.echo(f"cell {cell_id}: decision withdrawn")
                else:
                    click.echo(f"cell {cell_id}: {r.decide(cell_id, cast(str, label))} (by {r.name})")
            elif apply_file:
                n = r.apply(apply_file)
                blank = f"; {r.left_blank} row(s) with no label left undecided" if r.left_blank else ""
                click.echo(f"{n} decisions recorded from {apply_file} (by {r.name}){blank}")
            else:
                if not has_display() or not opencv_gui():
                    why = "no screen" if not has_display() else NO_GUI_HINT
                    raise CliFail(
                        f"the review window needs a screen ({why}); without one, list the cells with "
                        f"--list and decide with --cell ID --label L or --apply decisions.csv"
                    )
                n = review_window(
                    r,
                    include_counted,
                    echo=click.echo,
                    order=(lambda cs: teaching_queue(cs, per_class)) if for_adapt else None,
                )
                click.echo(f"{n} decisions recorded (by {r.name})")
    except (ReviewError, FileNotFoundError, sessiondb.UnreadableSession) as e:
        raise CliFail(str(e)) from e
    except sqlite3.Error as e:
        raise CliFail(f"{out_dir}/session.sqlite: {e}") from e
    written = one_line_errors(write_session_files, out_dir)
    click.echo(f"report: {next(p for p in written if p.name == 'report.html')}")

"""The ``bmc`` command line. Verbs mirror the folders; heavy imports happen inside each verb so
that ``bmc edge`` on a device never imports TensorFlow."""

from __future__ import annotations

import json
import sys

import click

from bmc.errors import BmcError
from convert.gate import Gate
from train.config import default as _td  # every training default, written once (TrainConfig)

# the label sources of train/data.py (folder, file-name prefix, PBC maturation stage); written here
# too so that the device's CLI does not import the training package to build its options
LABEL_SOURCES = ("folder", "prefix", "stage")


class _Fail(click.ClickException):
    """An expected error: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _guard(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, an expected error (:class:`bmc.errors.BmcError`, a missing file)
    turned into one line and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except (BmcError, FileNotFoundError) as e:
        raise _Fail(str(e)) from e


class _Main(click.Group):
    """The front door: a domain error raised anywhere below a verb is caught here, once."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BmcError as e:
            raise _Fail(str(e)) from e


def _need_training(verb: str, module: str, *also: str) -> None:
    """One clear line, not a traceback, when a verb that trains or converts runs on a device
    install (the edge extra has no Keras, TensorFlow or scikit-learn)."""
    import importlib
    import importlib.util

    missing = [m for m in also if importlib.util.find_spec(m) is None]
    if not missing:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = [e.name or str(e)]
    if missing:
        raise _Fail(
            f"{verb} needs the training packages, not installed here (missing: {', '.join(missing)}): "
            "pip install 'bmc-edge[train]' on a workstation or server; a device needs only [edge]"
        )


def _write_json(path, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


@click.group(cls=_Main)
@click.version_option(package_name="bmc-edge")
def main():
    """bmc — bone-marrow cell classification at the microscope."""


@main.group()
def data():
    """Inspect and pack labelled cell-image data sets."""


@data.command("check")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--label-from",
    type=click.Choice(LABEL_SOURCES),
    default="folder",
    show_default=True,
    help="class from the first folder under DATA_DIR, or from the file-name prefix",
)
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with path,label[,group] columns")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the report as JSON")
def data_check(data_dir, label_from, manifest, json_out):
    """Classes and counts, image sizes, unreadable files, duplicates and imbalance of DATA_DIR."""
    from train.data import check

    report = _guard(check, data_dir, label_from, manifest)
    click.echo(report.table())
    if json_out:
        _write_json(json_out, report.to_dict())


@data.command("split")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="split.json to write")
@click.option("--label-from", type=click.Choice(LABEL_SOURCES), default="folder", show_default=True)
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with path,label[,group] columns")
@click.option("--seed", default=_td("seed"), show_default=True)
@click.option(
    "--like",
    "like",
    type=click.Path(exists=True, dir_okay=False),
    help="keep this split.json's partition and read the labels afresh (--label-from prefix or stage): "
    "a stage model trained and tested on the same images as the 8-class one",
)
def data_split(data_dir, out, label_from, manifest, seed, like):
    """The stratified, grouped train/val/test split that `bmc train DATA_DIR --seed N` makes, written
    to --out without training: fix the partition once, then train on it with --split."""
    from collections import Counter

    from train.data import discover, load_split, relabel, save_split, split

    dropped = 0
    if like:
        parts, dropped = _guard(relabel, load_split(like), label_from)
    else:
        parts = _guard(lambda: split(discover(data_dir, label_from, manifest), seed=seed))
    save_split(parts, out)
    click.echo(
        ", ".join(f"{k} {len(v)}" for k, v in parts.items())
        + f" images; {len(Counter(s.label for s in parts['train']))} classes → {out}"
        + (f" ({dropped} images without a {label_from} label left out)" if dropped else "")
    )


@data.command("pack")
@click.argument("source", type=click.Path(exists=True))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--side", default=256, show_default=True, help="shorter side in pixels (never enlarged)")
@click.option("--quality", default=70, show_default=True, help="WebP quality")
@click.option("--label-from", type=click.Choice(LABEL_SOURCES), default="folder", show_default=True)
def data_pack(source, dest, side, quality, label_from):
    """A compact WebP copy of SOURCE (a data folder or a split.json) in DEST, to carry to a GPU server.

    From a split.json, DEST/split.json keeps the same partition: `bmc train DEST --split
    DEST/split.json` trains on it."""
    from train.data import pack

    n, skipped = _guard(pack, source, dest, side, quality, label_from)
    for _path, why in skipped:
        click.echo(f"skipped unreadable image: {why}", err=True)
    click.echo(f"{n} images packed into {dest}" + (f" ({len(skipped)} unreadable, left out)" if skipped else ""))


@data.command("harvest")
@click.argument("sessions", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "dest", required=True, type=click.Path(file_okay=False), help="data set folder to write")
@click.option(
    "--with",
    "with_data",
    type=click.Path(file_okay=False),
    help="also list every image of this data set in the manifest (e.g. ../shared/data/pbc)",
)
@click.option(
    "--label-from",
    type=click.Choice(LABEL_SOURCES),
    default="folder",
    show_default=True,
    help="how --with's images are labelled",
)
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="the .tflite the sessions ran with, for sessions that do not record its contract",
)
def data_harvest(sessions, dest, with_data, label_from, model):
    """The cells a person labelled in edge SESSIONS (bmc edge review) as a training set: DEST/<label>/*.png
    at the trained geometry and DEST/manifest.csv; train with: bmc train DEST --manifest DEST/manifest.csv"""
    from train.harvest import harvest

    fallback = None
    if model:
        from bmc.card import load_card

        fallback = _guard(load_card, model)[1]
    s = _guard(harvest, sessions, dest, with_data, label_from, fallback)
    for item in s["skipped"]:
        click.echo(f"skipped {item['cell']}: {item['why']}", err=True)
    click.echo(
        f"{s['cells']} reviewed cells written to {dest} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(s["by_label"].items()))
        + ")"
        + (f", with {s['with_data_images']} images of {with_data}" if with_data else "")
        + f"; train with: bmc train {dest} --manifest {dest}/manifest.csv"
    )


@main.command("train")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder to write")
@click.option(
    "--backbone",
    type=click.Choice(["efficientnet_lite0", "efficientnet_b0"]),
    default=_td("backbone"),
    show_default=True,
)
@click.option(
    "--weights",
    default=_td("weights"),
    show_default=True,
    help="'imagenet', 'none' (random init) or a local weights file",
)
@click.option("--label-from", type=click.Choice(LABEL_SOURCES), default=_td("label_from"), show_default=True)
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with path,label[,group] columns")
@click.option("--split", "split_file", type=click.Path(dir_okay=False), help="reuse a split.json")
@click.option(
    "--mode",
    type=click.Choice(["auto", "cached", "full"]),
    default=_td("mode"),
    show_default=True,
    help="cached: CPU path on cached activations; full: end-to-end (GPU)",
)
@click.option("--fine-tune-from", default=_td("fine_tune_from"), show_default=True, help="first block to unfreeze")
@click.option("--views", default=_td("views"), show_default=True, help="augmented views per training image (cached)")
@click.option("--head-epochs", default=_td("head_epochs"), show_default=True)
@click.option("--fine-tune-epochs", default=_td("fine_tune_epochs"), show_default=True)
@click.option("--head-lr", default=_td("head_lr"), show_default=True)
@click.option(
    "--fine-tune-lr", default=_td("fine_tune_lr"), show_default=True, help="peak; cosine decay to 5% over the epochs"
)
@click.option(
    "--patience",
    default=_td("patience"),
    show_default=True,
    help="epochs without a better validation macro-F1 before a phase stops",
)
@click.option(
    "--label-smoothing", default=_td("label_smoothing"), show_default=True, help="target share spread over every class"
)
@click.option(
    "--neighbour-smoothing",
    default=_td("neighbour_smoothing"),
    show_default=True,
    help="target share given to the adjacent maturation stages (stage models)",
)
@click.option("--batch-size", default=_td("batch_size"), show_default=True)
@click.option("--input-size", default=_td("input_size"), show_default=True)
@click.option(
    "--stain-norm",
    type=click.Choice(["stretch", "none"]),
    default=_td("stain_norm"),
    show_default=True,
    help="per-image colour normalisation, part of the model's contract (same on the device)",
)
@click.option("--limit-per-class", type=int, help="use at most N images per class (quick runs)")
@click.option(
    "--strategy", type=click.Choice(["auto", "default", "mirrored"]), default=_td("strategy"), show_default=True
)
@click.option(
    "--mixed-precision", type=click.Choice(["auto", "on", "off"]), default=_td("mixed_precision"), show_default=True
)
@click.option("--seed", default=_td("seed"), show_default=True)
@click.option(
    "--init-from",
    type=click.Path(dir_okay=False),
    help="start from a trained model.keras (backbone; head too when it has the same classes)",
)
def train_cmd(data_dir, out, **kw):
    """Fine-tune an ImageNet EfficientNet on DATA_DIR; writes model, split and metrics to --out."""
    _need_training("bmc train", "train.trainer", "keras", "cv2")
    from train.config import TrainConfig
    from train.trainer import train

    cfg = _guard(TrainConfig, data=data_dir, out=out, **kw)
    m = _guard(train, cfg)
    click.echo(f"test accuracy {m['accuracy']:.4f} · macro-F1 {m['macro_f1']:.4f} · n {m['n']}")


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False), required=False)
@click.option(
    "--split",
    "split_file",
    type=click.Path(dir_okay=False),
    help="evaluate on one part of a split.json instead of DATA_DIR",
)
@click.option("--part", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option(
    "--orientations",
    type=click.Choice(["1", "2", "4", "8"]),
    default="1",
    show_default=True,
    help="average each image over this many rotations / mirror images, as the edge app does",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the metrics as JSON")
def evaluate_cmd(model, data_dir, split_file, part, orientations, json_out):
    """Accuracy, macro-F1 and per-class metrics of MODEL (.keras or .tflite) on DATA_DIR, or on
    the held-out part of a run's split (--split runs/x/split.json)."""
    from train.evaluate import evaluate
    from train.metrics import per_class_table

    if (data_dir is None) == (split_file is None):
        raise click.UsageError("give DATA_DIR or --split FILE (one of them)")
    m = _guard(evaluate, model, data_dir, split_file=split_file, part=part, orientations=int(orientations))
    for item in m.get("skipped", []):
        click.echo(f"skipped {item['path']}: {item['why']}", err=True)
    click.echo(per_class_table(m))
    if m.get("skipped"):
        click.echo(f"{len(m['skipped'])} unreadable image(s) left out of these figures (listed above)")
    if m.get("level", "model") != "model":
        click.echo(f"scored at the {m['level']} level: the data's labels are the model's 8 classes")
    if m.get("coarse"):
        c, e = m["coarse"], m["stage_errors"]
        click.echo(
            f"8-class level (the stages summed into their classes): accuracy {c['accuracy']:.4f}, "
            f"macro-F1 {c['macro_f1']:.4f}"
        )
        click.echo(
            f"stage errors: {e['errors']}, of which {e['one_stage_off']} one stage off in the granulocytic "
            f"series, {e['further_in_series']} further along it, {e['other']} across classes"
        )
    click.echo(
        f"the edge app's review policy would set aside {m['set_aside']:.1%} of these images; "
        f"accuracy of the rest {m['counted_accuracy']:.4f}"
    )
    if m.get("unknown"):
        u = m["unknown"]
        click.echo(
            f"unknown-cell check (level {u['level']}): {u['set_aside']:.1%} set aside as unknown; accuracy "
            f"{u['accuracy_all']:.4f} on all, {u['accuracy_counted']:.4f} on the cells counted"
        )
    if json_out:
        _write_json(json_out, m)


@main.command("convert")
@click.argument("source", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="output folder (default: SOURCE/tflite)")
@click.option("--name", default="bmc", show_default=True, help="file-name stem of the variants")
@click.option(
    "--variants",
    default="float32,float16,dynamic,int8",
    show_default=True,
    help="comma-separated: " + ", ".join(["float32", "float16", "dynamic", "int8"]),
)
@click.option("--data", type=click.Path(file_okay=False), help="validation images when SOURCE has no split")
@click.option("--max-drop", default=Gate.max_drop, show_default=True, help="max accuracy drop, points")
@click.option(
    "--max-class-drop", default=Gate.max_class_drop, show_default=True, help="max recall drop of any class, points"
)
@click.option("--representative", default=200, show_default=True, help="calibration images for int8")
@click.option("--float-layers", default="", help="int8: comma-separated layers to keep in float, or 'auto'")
@click.option("--no-diagnose", is_flag=True, help="skip the per-layer report when int8 fails")
@click.option(
    "--ship",
    "ship_dir",
    type=click.Path(file_okay=False),
    help="copy the validated int8 and float16 variants, their cards and a model-card README here",
)
def convert_cmd(
    source, out_dir, name, variants, data, max_drop, max_class_drop, representative, float_layers, no_diagnose, ship_dir
):
    """Convert a run folder (or .keras) to TFLite variants and validate each against the float model."""
    from pathlib import Path

    _need_training("bmc convert", "convert.pipeline", "tensorflow")
    from convert.pipeline import Gate, convert_run

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    fl = "auto" if float_layers == "auto" else tuple(x for x in float_layers.split(",") if x)
    out = out_dir or str(Path(source if Path(source).is_dir() else Path(source).parent) / "tflite")
    report = _guard(
        convert_run,
        source,
        out,
        name,
        names,
        Gate(max_drop, max_class_drop),
        data,
        representative,
        not no_diagnose,
        fl,
        log=lambda m: click.echo(m, err=True),
    )
    from convert.pipeline import report_markdown

    click.echo(report_markdown(report))
    if ship_dir:
        import sys as _sys

        from convert.ship import ship

        run_dir = Path(source) if Path(source).is_dir() else None
        cmd = "bmc " + " ".join(_sys.argv[1:]) if _sys.argv and _sys.argv[0].endswith("bmc") else ""
        files = _guard(ship, out, name, ship_dir, run_dir, reproduce=cmd)
        click.echo("shipped: " + ", ".join(str(f) for f in files))


@main.command("prepare-adapt")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--split",
    "split_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="the split.json the models were trained on: the guard set comes from its training part",
)
@click.option("--per-class", default=200, show_default=True, help="training cells per class in the guard set")
@click.option("--orientations", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True)
def prepare_adapt(models, split_file, per_class, orientations):
    """Make converted MODELS adaptable on the device: the cell embedding as a second output (the class
    scores unchanged), a guard set of embedded training cells beside each, named in its card, and the
    unknown-cell check calibrated on the split's validation part.
    `bmc convert --ship` does this itself; this verb upgrades models converted before it did."""
    from convert.embedding import build_guard, calibrate_unknown, expose
    from train.data import load_split

    parts = _guard(load_split, split_file)
    for m in models:
        changed = _guard(expose, m)
        click.echo(f"{m}: " + ("embedding output added (class scores unchanged)" if changed else "gives its embedding"))
        out = _guard(build_guard, m, parts["train"], per_class, int(orientations), log=lambda t: click.echo(f"  {t}"))
        click.echo(f"{m}: guard set {out}")
        _guard(calibrate_unknown, m, parts["val"], int(orientations), log=lambda t, m=m: click.echo(f"{m}: {t}"))


@main.group()
def edge():
    """On the device: find, classify and count cells; report (no TensorFlow)."""


@edge.command("run")
@click.argument("source")
@click.option("--model", type=click.Path(dir_okay=False), help="a .tflite with its model card (default: shipped int8)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="session folder")
@click.option(
    "--mode",
    type=click.Choice(["field", "cell"]),
    default="field",
    show_default=True,
    help="field: find cells in each frame; cell: each frame is one centred cell",
)
@click.option("--target", type=click.IntRange(min=1), help="stop after this many counted cells (100, 200, 500 …)")
@click.option("--threads", type=click.IntRange(1, 256), help="inference threads (default: all cores)")
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
@click.option(
    "--orientations",
    type=click.Choice(["1", "2", "4", "8"]),
    default="4",
    show_default=True,
    help="classify each cell in this many rotations / mirror images and average",
)
@click.option(
    "--white-balance",
    is_flag=True,
    help="white-balance the session onto the model's training lamp (an experiment: see benchmarks/README.md)",
)
@click.option(
    "--unknown-level",
    type=float,
    default=0.98,
    show_default=True,
    help="set a cell aside as unknown beyond the distance this share of the training laboratory's "
    "validation cells keep (0.9-0.999; higher sets fewer aside; 0: off)",
)
def edge_run(
    source,
    model,
    out_dir,
    mode,
    target,
    threads,
    headless,
    max_frames,
    cell_diameter,
    new_session,
    no_crops,
    orientations,
    white_balance,
    unknown_level,
):
    """Classify and count the cells of SOURCE: a camera index or /dev path, picamera2, a GStreamer
    pipeline, a video, an image folder or glob, or one image."""
    import os

    from edge_app.app import EdgeSession, SessionConfig, has_display
    from edge_app.backends import BackendError
    from edge_app.differential import ReviewPolicy

    try:
        ReviewPolicy(unknown_level=unknown_level)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--unknown-level") from None
    from edge_app.model import DEFAULT_MODEL, CellClassifier
    from edge_app.sources import SourceError
    from edge_app.store import SessionFolderError

    def go():
        clf = CellClassifier(model or DEFAULT_MODEL, threads=threads or os.cpu_count(), orientations=int(orientations))
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
        )  # a person watches
        return EdgeSession(source, clf, out_dir, cfg, echo=click.echo).run()

    try:
        r = _guard(go)
    except (SourceError, BackendError, SessionFolderError) as e:
        raise _Fail(str(e)) from e
    if r.status == "disk-full":
        raise _Fail(r.message)


@edge.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def edge_serve(config_path):
    """Service mode: sessions back to back from the configured camera (for systemd)."""
    from edge_app import config as config_mod
    from edge_app.service import serve

    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        raise _Fail(str(e)) from e
    _guard(serve, cfg, echo=lambda m: click.echo(m, err=False))


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
def edge_ui(config_path, storage, listen, config_dir, set_password, user, source):
    """The technician's screen in a browser: sessions, differentials with their 95% limits, review
    by click or key, reports, the device check. Loopback only unless a password is set."""
    import os
    from pathlib import Path

    from edge_app import config as config_mod
    from edge_app.ui import auth

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
            raise _Fail(str(e)) from e
        click.echo(f"password hash written to {path} (readable by this user only)")
        return
    from edge_app.review import _user
    from edge_app.ui.app import UiApp, is_loopback, serve

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise click.BadParameter(f"{listen!r}: HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--listen")
    folder = storage or (cfg.storage.folder if cfg else None)
    if not folder:
        raise click.UsageError("give --storage FOLDER or --config bmc.toml (its [storage] folder)")
    if not os.path.isdir(folder):
        raise _Fail(f"{folder}: no such storage folder")
    sign_in = not is_loopback(host)
    stored = auth.stored_hash(cdir)
    if sign_in and not stored:
        raise _Fail(
            f"listening on {host} (beyond this computer) needs a password: bmc edge ui --set-password"
            + (f" --config-dir {cdir}" if config_dir else "")
        )
    from edge_app.service import session_config
    from edge_app.ui.live import LiveRunner

    model = (cfg.model.path or None) if cfg else None
    src = source or (cfg.camera.source if cfg else None)
    live = None
    if src:
        cam = {k: getattr(cfg.camera, k) for k in ("width", "height", "fps", "fourcc")} if cfg and not source else {}
        live = LiveRunner(folder, src, model, session_config(cfg) if cfg else None, cam)
    app = UiApp(folder, stored, sign_in, user or _user(), model=model, live=live, keys=cfg.screen.keys if cfg else None)

    def on_term(signum, _frame):  # systemd's stop: close a live session cleanly, then the server
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, on_term)
    try:
        serve(app, host, int(port), echo=click.echo)
    except KeyboardInterrupt:
        click.echo("stopping the screen")
    finally:
        if live is not None and live.running:
            live.stop()
            click.echo(f"live session {live.folder.name} closed: {live.state()['state']}")


@edge.command("export")
@click.argument("sessions", nargs=-1, type=click.Path(file_okay=False))
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False), help="USB stick or folder")
@click.option("--all-from", type=click.Path(file_okay=False), help="export every session under this storage folder")
def edge_export(sessions, dest, all_from):
    """Copy finished sessions (CSV, HTML report, crops, database) to a USB stick or folder."""
    from edge_app.service import export, session_dirs

    todo = [*sessions, *(session_dirs(all_from) if all_from else [])]
    if not todo:
        raise _Fail("nothing to export: name session folders or --all-from STORAGE")
    for s in todo:
        click.echo(f"exported {s} → {_guard(export, s, dest)}")


@edge.command("doctor")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    help="check this model (default: the config's [model] path, else the shipped one)",
)
def edge_doctor(config_path, model_path):
    """What this device has (runtime, cameras, model, disk, meters) and what is wrong."""
    from edge_app import config as config_mod
    from edge_app.service import doctor

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
def edge_report(out_dir, fhir):
    """Write OUT_DIR/report.html (counts, percentages, flagged cells, thumbnails) and cells.csv."""
    from edge_app.report import build_report
    from edge_app.store import write_csv

    path = _guard(build_report, out_dir)
    write_csv(out_dir)
    click.echo(f"report: {path}")
    if fhir:
        from edge_app import fhir as fhir_mod

        click.echo(f"FHIR R4 DiagnosticReport: {_guard(fhir_mod.write, out_dir)}")


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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the validation as JSON")
def edge_adapt(sessions, out_dir, name, model, max_guard_drop, json_out):
    """Adapt the model to this microscope from the cells people reviewed in SESSIONS: a new class head
    fitted on the device (numpy, seconds), cross-validated against the shipped one and refused unless
    better. Writes OUT/NAME.tflite and its card; run it with bmc edge run --model (or [model] path)."""
    import datetime

    from edge_app import adapt
    from edge_app.model import DEFAULT_MODEL, CellClassifier

    s = adapt.Settings(max_guard_drop=max_guard_drop)
    clf = _guard(CellClassifier, model or DEFAULT_MODEL, orientations=1)
    guard, reviewed, r = _guard(adapt.prepare, sessions, clf, s)
    click.echo(
        f"{len(reviewed.labels)} reviewed cells from {len(reviewed.sessions)} session folder(s) by "
        f"{', '.join(reviewed.reviewers)}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.cells_per_class.items()))
    )
    click.echo(r.table())
    if json_out:
        _write_json(
            json_out,
            {
                "accepted": r.accepted,
                "reasons": r.reasons,
                "cells_per_class": r.cells_per_class,
                "cross_validation": r.cross_validation,
                "guard": r.guard,
                "seconds": r.seconds,
            },
        )
    if r.advice:
        click.echo("more reviewed cells would help: " + "; ".join(r.advice))
    if not r.accepted:
        raise _Fail(
            "adapted model refused, nothing written: "
            + "; ".join(r.reasons)
            + ". Review more cells (bmc edge review --for-adapt) and adapt again"
        )
    stem = name or f"{clf.path.stem}_adapted_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    path = _guard(adapt.write_model, r, reviewed, clf, guard, out_dir, stem, s)
    click.echo(f"adapted in {r.seconds:.1f} s; count with it: bmc edge run SOURCE --model {path}")
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
def edge_review(
    out_dir, reviewer, list_only, cell_id, label, undo, apply_file, include_counted, new_label, for_adapt, per_class
):
    """Review the cells OUT_DIR set aside: one by one in a window, or by --cell/--label or --apply;
    then rewrite cells.csv and report.html with the differential after review."""
    import csv
    import sqlite3

    from edge_app.app import NO_GUI_HINT, has_display, opencv_gui
    from edge_app.report import build_report
    from edge_app.review import Reviewer, ReviewError, cells, connect, queue, review_window, teaching_queue
    from edge_app.store import write_csv

    if (label or undo) and cell_id is None:
        raise click.UsageError("--label and --undo need --cell ID")
    if cell_id is not None and bool(label) == bool(undo):
        raise click.UsageError("--cell needs --label L or --undo (one of them)")
    try:
        if list_only:  # a decisions file to fill in (the label column left empty), read-only
            db = connect(out_dir)
            try:
                todo = teaching_queue(cells(db), per_class) if for_adapt else queue(cells(db), include_counted)
            finally:
                db.close()
            out = csv.writer(click.get_text_stream("stdout"))
            out.writerow(["id", "label", "model_label", "confidence", "flag", "source", "frame", "crop"])
            out.writerows(
                [c.id, "", c.model_label, f"{c.confidence:.3f}", c.flag, c.source, c.frame, c.crop] for c in todo
            )
            click.echo(f"{len(todo)} cells to review: fill in the label column and --apply the file", err=True)
            return
        with Reviewer(out_dir, reviewer, allow_new_labels=new_label) as r:
            if cell_id is not None:
                if undo:
                    r.undo(cell_id)
                    click.echo(f"cell {cell_id}: decision withdrawn")
                else:
                    click.echo(f"cell {cell_id}: {r.decide(cell_id, label)} (by {r.name})")
            elif apply_file:
                click.echo(f"{r.apply(apply_file)} decisions recorded from {apply_file} (by {r.name})")
            else:
                if not has_display() or not opencv_gui():
                    why = "no screen" if not has_display() else NO_GUI_HINT
                    raise _Fail(
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
    except (ReviewError, FileNotFoundError) as e:
        raise _Fail(str(e)) from e
    except sqlite3.Error as e:
        raise _Fail(f"{out_dir}/session.sqlite: {e}") from e
    _guard(write_csv, out_dir)
    click.echo(f"report: {_guard(build_report, out_dir)}")


@main.group()
def bench():
    """Measure models and the edge pipeline (benchmarks/)."""


@bench.command("generalisation")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@click.option(
    "--orientations",
    type=click.Choice(["1", "2", "4", "8"]),
    default="1",
    show_default=True,
    help="average over this many rotations / mirror images of each cell, as the edge app does",
)
@click.option(
    "--scale", default=1.0, show_default=True, help="diagnostic: cut each cell at this multiple of the measured scale"
)
@click.option(
    "--matek",
    type=click.Path(file_okay=False),
    help="score the Munich bone-marrow cells in this folder (CODE/*.jpg) instead of BCCD",
)
@click.option(
    "--calibrate",
    type=click.Choice(["none", "white", "stains"]),
    default="none",
    show_default=True,
    help="diagnostic: map the set's stain (BCCD's, or Munich's with --matek) onto the "
    "training stain (--reference) before classifying",
)
@click.option(
    "--reference",
    type=click.Path(file_okay=False),
    help="class folders of the training images, for --calibrate (default ../shared/data/pbc)",
)
def bench_generalisation(model, bccd, json_out, orientations, scale, matek, calibrate, reference):
    """Accuracy of MODEL on white cells of another microscope (BCCD fields, or Munich bone-marrow
    cells with --matek; cut at the trained scale)."""
    from benchmarks.generalisation import DEFAULT_BCCD, DEFAULT_PBC, score
    from train.metrics import per_class_table

    m = _guard(score, model, bccd or DEFAULT_BCCD, int(orientations), scale, matek, calibrate, reference or DEFAULT_PBC)
    click.echo(per_class_table(m))
    if json_out:
        _write_json(json_out, m)


@bench.command("latency")
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--threads", type=int, help="inference threads (default: all cores)")
@click.option("--thread-sweep", is_flag=True, help="repeat for 1..cores threads")
@click.option("--runs", default=200, show_default=True)
@click.option("--baseline-keras", is_flag=True, help="add the float Keras model called per image (the seed's way)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@click.option("--no-record", is_flag=True, help="do not append to benchmarks/results/latency.csv")
def bench_latency(models, threads, thread_sweep, runs, baseline_keras, json_out, no_record):
    """Latency p50/p90/p99, throughput, init time, peak memory and size of MODELS, interleaved."""
    import os

    from benchmarks import latency, results

    if not models and not baseline_keras:
        from edge_app.model import DEFAULT_MODEL

        models = (str(DEFAULT_MODEL),)
    sweep = range(1, (os.cpu_count() or 1) + 1) if thread_sweep else [threads]
    res = None
    for t in sweep:
        r = _guard(latency.run, list(models), t, runs, baseline_keras=baseline_keras)
        if res is None:
            res = r
        else:
            res["rows"] += r["rows"]
    click.echo(latency.markdown(res))
    if not no_record:
        results.append("latency", res["rows"], res["machine"])
    if json_out:
        _write_json(json_out, res)


@bench.command("edge")
@click.option("--source", required=True, help="folder, glob or video of fields")
@click.option("--model", type=click.Path(dir_okay=False))
@click.option("--threads", type=int)
@click.option("--orientations", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@click.option("--no-record", is_flag=True)
def bench_edge(source, model, threads, orientations, json_out, no_record):
    """Frames/s, cells/s and per-stage time of the real edge pipeline, headless."""
    from benchmarks import pipeline, results

    res = _guard(pipeline.run, source, model, threads, orientations=int(orientations))
    click.echo(pipeline.markdown(res))
    if not no_record:
        results.append("edge", [{k: v for k, v in res.items() if k != "machine"}], res["machine"])
    if json_out:
        _write_json(json_out, res)


@bench.command("bccd")
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@click.option("--model", type=click.Path(dir_okay=False))
@click.option("--orientations", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True)
@click.option("--white-balance", is_flag=True, help="white-balance the session onto the model's training lamp")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_bccd(bccd, model, orientations, white_balance, json_out):
    """Cell finding (recall/precision vs the WBC boxes) and field classification on BCCD."""
    from benchmarks import detection
    from benchmarks.generalisation import DEFAULT_BCCD

    root = bccd or DEFAULT_BCCD
    f = _guard(detection.finding, root)
    click.echo(
        f"cell finding: recall {f['recall']:.4f}, precision {f['precision']:.4f} "
        f"({f['boxes']} WBC boxes, {f['found']} cells found, {f['missed']} missed, "
        f"{f['false_positives']} outside any box)"
    )
    c = _guard(detection.field_classification, root, model, int(orientations), white_balance)
    click.echo(
        f"field classification ({c['fields']} single-WBC fields, most confident white cell, "
        f"{c['orientations']} orientations{', white-balanced' if c['white_balance'] else ''}): accuracy "
        f"{c['accuracy']:.4f}, balanced accuracy {c['balanced_accuracy']:.4f}; recall "
        + ", ".join(f"{k} {v:.2f}" for k, v in c["recall"].items())
    )
    click.echo(
        f"counted without review: {1 - c['set_aside']:.1%} of the fields' answers (the rest set aside); "
        f"accuracy {c['counted_accuracy']:.4f}, balanced accuracy {c['counted_balanced_accuracy']:.4f}; "
        "recall " + ", ".join(f"{k} {v:.2f}" for k, v in c["counted_recall"].items())
    )
    if json_out:
        _write_json(json_out, {"finding": f, "classification": c})


@bench.command("finding")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="the folder of fields")
@click.option(
    "--boxes", required=True, type=click.Path(exists=True), help="VOC XML folder, CSV file, or YOLO .txt folder"
)
@click.option("--format", "fmt", type=click.Choice(["voc", "csv", "yolo"]), required=True)
@click.option(
    "--label",
    default="WBC",
    show_default=True,
    help="the white cells' box label (YOLO: its class number; Aslan's CSV: wbc)",
)
@click.option("--errors", type=click.Path(file_okay=False), help="write errors.csv, misses.png, false_finds.png here")
@click.option(
    "--tint",
    type=click.FloatRange(0, 2),
    default=0.0,
    show_default=True,
    help="tint the red cells bluish first, as an alkaline Giemsa does (0.5 lilac, 1.0 bluish-grey)",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_finding(source, boxes, fmt, label, errors, tint, json_out):
    """Recall and precision of the cell finder against white-cell boxes in VOC, CSV or YOLO form."""
    from benchmarks import finding

    r = _guard(lambda: finding.finding(finding.read_boxes(source, boxes, fmt, label), errors=errors, tint=tint))
    click.echo(
        f"cell finding on {r['fields']} fields"
        + (f" tinted {tint:g}" if tint else "")
        + f": recall {r['recall']:.4f}, precision {r['precision']:.4f} "
        f"({r['boxes']} boxes, {r['found']} cells found, {r['missed']} missed, {r['false_finds']} false finds)"
        + (f"; errors in {errors}" if errors else "")
    )
    if json_out:
        _write_json(json_out, r)


@bench.command("ood")
@click.option("--model", type=click.Path(dir_okay=False), help="default: the shipped int8")
@click.option(
    "--level",
    type=click.FloatRange(0.9, 0.999),
    default=0.98,
    show_default=True,
    help="the unknown-cell level, as [review] unknown_level",
)
@click.option(
    "--data",
    "data_root",
    type=click.Path(file_okay=False),
    help="the folder with pbc/, bccd/ and matek-bm-samples/ (default: ../shared/data)",
)
@click.option(
    "--reviewed",
    type=click.IntRange(0, 100),
    default=0,
    show_default=True,
    help="play a laboratory adapted at the BCCD microscope: this many BCCD cells per class join the "
    "reference (as bmc edge adapt adds the reviewed cells); BCCD is scored on the others",
)
@click.option("--seed", default=0, show_default=True, help="which BCCD cells are the reviewed ones")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_ood(model, level, data_root, reviewed, seed, json_out):
    """Cells the model does not know: the share set aside as unknown of Munich blasts, artefacts and
    other cells no model here names, and of PBC test and BCCD white cells; accuracy on those counted."""
    from benchmarks import ood

    r = _guard(lambda: ood.run(model, level, data_root or ood.DEFAULT_DATA, reviewed=reviewed, seed=seed))
    click.echo(ood.markdown(r))
    if json_out:
        _write_json(json_out, r)


@bench.command("adapt")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="folder the --truth files are under")
@click.option(
    "--truth",
    "truth_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV file,label (bmc bench truth writes BCCD's and Munich's)",
)
@click.option("--k", default=10, show_default=True, help="fields labelled per class")
@click.option("--seeds", default="1,2,3", show_default=True, help="comma-separated: which fields are labelled")
@click.option("--mode", type=click.Choice(["field", "cell"]), default="field", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False), help="base model (default: the shipped int8)")
@click.option("--orientations", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True)
@click.option(
    "--ceiling",
    is_flag=True,
    help="label every field instead: the refit head's cross-validated balanced accuracy, the most "
    "any K can reach with this model's embedding",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_adapt(source, truth_file, k, seeds, mode, model, orientations, ceiling, json_out):
    """Adaptation as a laboratory lives it: run, label K fields per class, bmc edge adapt, run again;
    balanced accuracy of the fields not labelled, before and after, for each seed."""
    from benchmarks import adapt as bench

    if ceiling:
        res = _guard(
            bench.ceiling, source, truth_file, mode, model, int(orientations), log=lambda m: click.echo(m, err=True)
        )
        click.echo(
            f"{res['labelled']} of {res['fields']} fields labelled; cross-validated balanced accuracy on "
            f"held-out labelled cells: shipped head {res['shipped']['balanced_accuracy']:.3f}, refit head "
            f"{res['adapted']['balanced_accuracy']:.3f}"
        )
        if json_out:
            _write_json(json_out, res)
        return

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: comma-separated integers", param_hint="--seeds") from None
    res = _guard(
        bench.run,
        source,
        truth_file,
        k,
        seed_list,
        mode,
        model,
        int(orientations),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(bench.markdown(res))
    if json_out:
        _write_json(json_out, res)


@bench.command("truth")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["bccd", "matek"]), required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def bench_truth(source, fmt, out):
    """Write the file,label truth of SOURCE for bmc bench adapt: BCCD's single-white-cell fields, or
    the Munich cells whose code the 8 classes name."""
    from benchmarks import adapt as bench

    n = (bench.write_truth_bccd if fmt == "bccd" else bench.write_truth_matek)(source, out)
    click.echo(f"{n} {'fields' if fmt == 'bccd' else 'cells'} → {out}")


@bench.command("ui")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="a folder of fields to replay")
@click.option("--fps", default=30.0, show_default=True, help="the replayed camera's frame rate")
@click.option("--frames", default=300, show_default=True)
@click.option("--model", type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_ui(source, fps, frames, model, json_out):
    """The screen's delay and cost: frame-to-viewer latency over the live MJPEG stream, and the
    pipeline's frames/s with the screen and one viewer against headless, on a replayed camera."""
    from benchmarks import ui

    r = _guard(ui.run, source, fps, frames, model, log=lambda m: click.echo(m, err=True))
    click.echo(ui.markdown(r))
    if json_out:
        _write_json(json_out, r)


@bench.command("soak")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="a folder of fields")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="a fresh session folder")
@click.option("--kills", default=100, show_default=True)
@click.option("--max-delay", default=6.0, show_default=True, help="seconds: each kill comes after 0.2..this")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_soak(source, out, kills, max_delay, seed, json_out):
    """SIGKILL `bmc edge run` KILLS times at random moments, re-running into the same folder; then check
    that no committed frame was lost and every field was counted exactly once."""
    from benchmarks import soak

    try:
        r = soak.run(source, out, kills, max_delay, seed, log=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise _Fail(str(e)) from e
    click.echo(soak.markdown(r))
    if json_out:
        _write_json(json_out, r)
    if r["committed_frames_lost"] or r["integrity_failures"] or r["fields_recorded_twice"] or r["fields_missing"]:
        raise SystemExit(1)


@bench.command("compare")
@click.argument("items", nargs=-1, required=True, type=click.Path())
@click.option("--data", required=True, type=click.Path(file_okay=False), help="class-folder images to score on")
@click.option("--runs", default=100, show_default=True)
@click.option("--threads", type=int)
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of accuracy against latency")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_compare(items, data, runs, threads, plot, json_out):
    """Accuracy and macro-F1 on DATA beside latency and size, for a run's variants or given models."""
    from benchmarks import compare, results

    res = _guard(compare.run, items, data, runs, threads, plot)
    click.echo(compare.markdown(res))
    results.append("compare", res["rows"], res["machine"])
    if json_out:
        _write_json(json_out, res)


@bench.command("energy")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--meter",
    default="auto",
    show_default=True,
    help="auto, rapl, jetson, pi5, ina260, ina219, or csv:PATH (an external meter's log)",
)
@click.option("--runs", default=500, show_default=True, help="inferences in the timed run")
@click.option("--idle-s", default=5.0, show_default=True, help="idle baseline before the run")
@click.option("--threads", type=int)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench_energy(model, meter, runs, idle_s, threads, json_out):
    """Joules per inference of MODEL, idle power subtracted, on this device's power meter."""
    import os

    import numpy as np

    from benchmarks import energy, machine
    from edge_app.backends.litert import LiteRTBackend
    from edge_app.model import DEFAULT_MODEL

    makers = {
        "rapl": energy.RaplMeter,
        "jetson": energy.JetsonMeter,
        "pi5": energy.Pi5PmicMeter,
        "ina260": lambda: energy.INA2xxMeter("ina260"),
        "ina219": lambda: energy.INA2xxMeter("ina219"),
    }
    try:
        if meter == "auto":
            found = energy.find_meters()
            if not found:
                click.echo(
                    "no power meter found on this machine (looked for Intel RAPL, a Jetson INA3221, "
                    "a Raspberry Pi 5 PMIC): energy not measured. Use --meter ina260/ina219 or "
                    "--meter csv:LOG for an external meter."
                )
                return
            m = found[0]
        elif meter.startswith("csv:"):
            m = energy.CsvLogMeter(meter[4:])
        elif meter in makers:
            m = makers[meter]()
        else:
            raise _Fail(f"unknown meter {meter!r}")
    except energy.MeterError as e:
        raise _Fail(str(e)) from e
    b = LiteRTBackend(str(model or DEFAULT_MODEL), threads or os.cpu_count())
    size = b.input_shape[1]
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    try:
        r = energy.joules_per_inference(m, lambda: b.predict(x), runs, idle_s)
    except energy.MeterError as e:
        raise _Fail(str(e)) from e
    r.update(model=str(model or DEFAULT_MODEL), machine=machine.describe())
    click.echo(
        f"{r['meter']}: idle {r['idle_w']:.2f} W, {r['avg_w']:.2f} W while running; "
        f"{1000 * r['joules_per_inference']:.2f} mJ per inference above idle ({runs} inferences)"
    )
    if json_out:
        _write_json(json_out, r)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``bmc train``, ``evaluate``, ``convert`` and ``prepare-adapt``: a model's life before the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from bmc.cli.common import LABEL_SOURCES, need_training, one_line_errors, orientations_option, write_json
from bmc.convert.gate import Gate
from bmc.train.backbones import BACKBONES
from bmc.train.config import default as _td  # every training default, written once (TrainConfig)

if TYPE_CHECKING:
    from bmc.train.data import Sample


@click.command("train")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder to write")
@click.option(
    "--backbone",
    type=click.Choice(list(BACKBONES)),
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
def train_cmd(data_dir: str, out: str, **kw: Any) -> None:
    """Fine-tune an ImageNet EfficientNet on DATA_DIR; writes model, split and metrics to --out."""
    need_training("bmc train", "bmc.train.trainer", "keras", "cv2")
    from bmc.train.config import TrainConfig
    from bmc.train.trainer import train

    cfg = one_line_errors(TrainConfig, data=data_dir, out=out, **kw)
    m = one_line_errors(train, cfg).metrics
    click.echo(f"test accuracy {m.accuracy:.4f} · macro-F1 {m.macro_f1:.4f} · n {m.n}")


@click.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False), required=False)
@click.option(
    "--split",
    "split_file",
    type=click.Path(dir_okay=False),
    help="evaluate on one part of a split.json instead of DATA_DIR",
)
@click.option("--part", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@orientations_option("1", "average each image over this many rotations / mirror images, as the edge app does")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the metrics as JSON")
def evaluate_cmd(
    model: str, data_dir: str | None, split_file: str | None, part: str, orientations: str, json_out: str | None
) -> None:
    """Accuracy, macro-F1 and per-class metrics of MODEL (.keras or .tflite) on DATA_DIR, or on
    the held-out part of a run's split (--split runs/x/split.json)."""
    from bmc.train.evaluate import evaluate
    from bmc.train.metrics import per_class_table

    if (data_dir is None) == (split_file is None):
        raise click.UsageError("give DATA_DIR or --split FILE (one of them)")
    ev = one_line_errors(evaluate, model, data_dir, split_file=split_file, part=part, orientations=int(orientations))
    for item in ev.skipped:
        click.echo(f"skipped {item['path']}: {item['why']}", err=True)
    click.echo(per_class_table(ev.metrics))
    if ev.skipped:
        click.echo(f"{len(ev.skipped)} unreadable image(s) left out of these figures (listed above)")
    if ev.level != "model":
        click.echo(f"scored at the {ev.level} level: the data's labels are the model's 8 classes")
    if ev.coarse and ev.stage_errors:
        c, e = ev.coarse, ev.stage_errors
        click.echo(
            f"8-class level (the stages summed into their classes): accuracy {c.accuracy:.4f}, macro-F1 {c.macro_f1:.4f}"
        )
        click.echo(
            f"stage errors: {e['errors']}, of which {e['one_stage_off']} one stage off in the granulocytic "
            f"series, {e['further_in_series']} further along it, {e['other']} across classes"
        )
    click.echo(
        f"the edge app's review policy would set aside {ev.set_aside:.1%} of these images; "
        f"accuracy of the rest {ev.counted_accuracy:.4f}"
    )
    if ev.unknown:
        u = ev.unknown
        click.echo(
            f"unknown-cell check (level {u.level}): {u.set_aside:.1%} set aside as unknown; accuracy "
            f"{u.accuracy_all:.4f} on all, {u.accuracy_counted:.4f} on the cells counted"
        )
    if json_out:
        write_json(json_out, ev.to_dict())


@click.command("convert")
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
    source: str,
    out_dir: str | None,
    name: str,
    variants: str,
    data: str | None,
    max_drop: float,
    max_class_drop: float,
    representative: int,
    float_layers: str,
    no_diagnose: bool,
    ship_dir: str | None,
) -> None:
    """Convert a run folder (or .keras) to TFLite variants and validate each against the float model."""
    from pathlib import Path

    need_training("bmc convert", "bmc.convert.build", "tensorflow")
    from bmc.convert.build import convert_run

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    fl = "auto" if float_layers == "auto" else tuple(x for x in float_layers.split(",") if x)
    out = out_dir or str(Path(source if Path(source).is_dir() else Path(source).parent) / "tflite")
    report = one_line_errors(
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
    from bmc.convert.build import report_markdown

    click.echo(report_markdown(report))
    if ship_dir:
        import sys as _sys

        from bmc.convert.ship import ship

        run_dir = Path(source) if Path(source).is_dir() else None
        cmd = "bmc " + " ".join(_sys.argv[1:]) if _sys.argv and _sys.argv[0].endswith("bmc") else ""
        files = one_line_errors(ship, out, name, ship_dir, run_dir, reproduce=cmd)
        click.echo("shipped: " + ", ".join(str(f) for f in files))


@click.command("convert-onnx")
@click.argument("source", type=click.Path())
@click.option(
    "--split",
    "split_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="the split.json the model was trained on: test part to validate, training part to calibrate int8 "
    "and for the guard set, validation part for the unknown-cell check",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option(
    "--name", default="bmc", show_default=True, help="file-name stem: NAME_onnx-fp32.onnx, NAME_onnx-int8.onnx"
)
@click.option("--max-drop", default=Gate.max_drop, show_default=True, help="max accuracy drop, points")
@click.option(
    "--max-class-drop", default=Gate.max_class_drop, show_default=True, help="max recall drop of any class, points"
)
@click.option("--representative", default=200, show_default=True, help="calibration images for int8")
@click.option("--per-class", default=200, show_default=True, help="training cells per class in the guard set")
@click.option(
    "--float-convs",
    default="auto",
    show_default=True,
    help="int8: how many leading convolutions stay in float; auto: the fewest of 0, 2, 4, 6 that pass the "
    "gate on the validation split",
)
@click.option(
    "--limit",
    type=click.IntRange(min=50),
    help="a quick check: this many test and validation images (an even sample), not all; the card "
    "records the number, and 50 validation cells is the least the unknown-cell check calibrates on",
)
def convert_onnx_cmd(
    source: str,
    split_file: str,
    out_dir: str,
    name: str,
    max_drop: float,
    max_class_drop: float,
    representative: int,
    per_class: int,
    float_convs: str,
    limit: int | None,
) -> None:
    """ONNX files of a model for ONNX Runtime (float32 and static int8), each validated against the
    float model on the held-out split as `bmc convert` does, with card, guard set and unknown-cell
    calibration. SOURCE: a run folder, a .keras file, or a shipped float16 .tflite (its float model
    recovered)."""
    from pathlib import Path

    need_training("bmc convert-onnx", "bmc.convert.onnx_export", "onnx")
    from bmc.convert import onnx_export

    def go() -> None:
        from bmc.card import load_card
        from bmc.convert.build import GateFailed, failure_message
        from bmc.convert.embedding import build_guard, calibrate_unknown
        from bmc.train.data import load_split

        if float_convs == "auto":
            prefixes: tuple[int, ...] = onnx_export.FLOAT_PREFIXES
        elif float_convs.isdigit():
            prefixes = (int(float_convs),)
        else:
            raise click.BadParameter(f"{float_convs!r}: 'auto' or a whole number", param_hint="--float-convs")
        src = Path(source)
        parts = load_split(split_file)
        if src.suffix == ".tflite":
            from bmc.train.recover import recover

            _, contract = load_card(src)
            model, model_file = recover(src, contract), src
        else:
            import keras

            from bmc.train.evaluate import contract_for

            model_file = src / "model.keras" if src.is_dir() else src
            contract, model = contract_for(model_file), keras.models.load_model(model_file, compile=False)

        def sample(part: list[Sample]) -> list[Sample]:
            return part[:: max(1, len(part) // limit)][:limit] if limit else part

        test, val = sample(parts["test"]), sample(parts["val"])
        out = Path(out_dir)
        log: Callable[[str], None] = lambda m: click.echo(m, err=True)  # noqa: E731
        rows = onnx_export.convert_onnx(
            model, contract, model_file, parts["train"], test, out, name, Gate(max_drop, max_class_drop),
            representative, val=val, float_prefixes=prefixes, log=log,
        )  # fmt: skip
        for r in rows:
            if r["passed"]:
                try:
                    build_guard(out / r["file"], parts["train"], per_class, log=lambda m: None)
                    calibrate_unknown(out / r["file"], val, log=lambda m, f=r["file"]: log(f"{f}: {m}"))
                except Exception:
                    # a model without its unknown-cell check must not count on a device
                    onnx_export.mark_not_deployable(out / r["file"], "guard set or unknown-cell calibration failed")
                    raise
        report = onnx_export.write_report(rows, out, name)
        click.echo(report.read_text())
        failed = [r for r in rows if not r["passed"]]
        if failed:
            raise GateFailed(failure_message(failed, Gate(max_drop, max_class_drop), report))

    one_line_errors(go)


@click.command("prepare-adapt")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--split",
    "split_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="the split.json the models were trained on: the guard set comes from its training part",
)
@click.option("--per-class", default=200, show_default=True, help="training cells per class in the guard set")
@orientations_option()
def prepare_adapt(models: tuple[str, ...], split_file: str, per_class: int, orientations: str) -> None:
    """Make converted MODELS adaptable on the device: the cell embedding as a second output (the class
    scores unchanged), a guard set of embedded training cells beside each, named in its card, and the
    unknown-cell check calibrated on the split's validation part.
    `bmc convert --ship` does this itself; this verb upgrades models converted before it did."""
    from bmc.convert.embedding import build_guard, calibrate_unknown, expose
    from bmc.train.data import load_split

    parts = one_line_errors(load_split, split_file)
    for m in models:
        changed = one_line_errors(expose, m)
        click.echo(f"{m}: " + ("embedding output added (class scores unchanged)" if changed else "gives its embedding"))
        out = one_line_errors(
            build_guard, m, parts["train"], per_class, int(orientations), log=lambda t: click.echo(f"  {t}")
        )
        click.echo(f"{m}: guard set {out}")
        one_line_errors(
            calibrate_unknown, m, parts["val"], int(orientations), log=lambda t, m=m: click.echo(f"{m}: {t}")
        )

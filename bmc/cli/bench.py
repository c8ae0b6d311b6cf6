"""``bmc bench``: measure models and the edge pipeline (``benchmarks/``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click

from bmc.cli.common import (
    CliFail,
    json_option,
    need_training,
    one_line_errors,
    orientations_option,
    seeds_option,
    threads_option,
    truth_options,
    write_json,
)
from bmc.edge_app.unknown import DEFAULT_LEVEL


@click.group()
def bench() -> None:
    """Measure models and the edge pipeline (benchmarks/)."""


@bench.command("generalisation")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@json_option
@orientations_option("1", "average over this many rotations / mirror images of each cell, as the edge app does")
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
def bench_generalisation(
    model: str,
    bccd: str | None,
    json_out: str | None,
    orientations: str,
    scale: float,
    matek: str | None,
    calibrate: str,
    reference: str | None,
) -> None:
    """Accuracy of MODEL on white cells of another microscope (BCCD fields, or Munich bone-marrow
    cells with --matek; cut at the trained scale)."""
    from bmc.benchmarks.generalisation import DEFAULT_BCCD, DEFAULT_PBC, score
    from bmc.train.metrics import Metrics, per_class_table

    m = one_line_errors(
        score, model, bccd or DEFAULT_BCCD, int(orientations), scale, matek, calibrate, reference or DEFAULT_PBC
    )
    click.echo(per_class_table(Metrics.from_dict(m)))
    if json_out:
        write_json(json_out, m)


@bench.command("latency")
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@threads_option
@click.option("--thread-sweep", is_flag=True, help="repeat for 1..cores threads")
@click.option("--runs", default=200, show_default=True)
@click.option("--baseline-keras", is_flag=True, help="add the float Keras model called per image (the seed's way)")
@click.option(
    "--split",
    "split_file",
    type=click.Path(dir_okay=False),
    help="also score each model's accuracy on this split.json's held-out test part",
)
@click.option("--limit", type=click.IntRange(min=8), help="with --split: an even sample of this many test images")
@json_option
@click.option("--no-record", is_flag=True, help="do not append to benchmarks/results/latency.csv")
def bench_latency(
    models: tuple[str, ...],
    threads: int | None,
    thread_sweep: bool,
    runs: int,
    baseline_keras: bool,
    split_file: str | None,
    limit: int | None,
    json_out: str | None,
    no_record: bool,
) -> None:
    """Latency p50/p90/p99, throughput, init time, peak memory and size of MODELS, interleaved."""
    import os

    from bmc.benchmarks import latency, results

    if not models and not baseline_keras:
        from bmc.edge_app.classifier import DEFAULT_MODEL

        models = (str(DEFAULT_MODEL),)
    sweep = range(1, (os.cpu_count() or 1) + 1) if thread_sweep else [threads]
    res = None
    for t in sweep:
        r = one_line_errors(
            latency.run, list(models), t, runs, baseline_keras=baseline_keras, split=split_file, limit=limit
        )
        if res is None:
            res = r
        else:
            res["rows"] += r["rows"]
    res = cast("dict[str, Any]", res)  # set in the first pass: the sweep is never empty
    click.echo(latency.markdown(res))
    if not no_record:
        results.append("latency", res["rows"], res["machine"])
    if json_out:
        write_json(json_out, res)


@bench.command("edge")
@click.option("--source", required=True, help="folder, glob or video of fields")
@click.option("--model", type=click.Path(dir_okay=False))
@threads_option
@orientations_option()
@json_option
@click.option("--no-record", is_flag=True)
def bench_edge(
    source: str, model: str | None, threads: int | None, orientations: str, json_out: str | None, no_record: bool
) -> None:
    """Frames/s, cells/s and per-stage time of the real edge pipeline, headless."""
    from bmc.benchmarks import results, throughput

    res = one_line_errors(throughput.run, source, model, threads, orientations=int(orientations))
    click.echo(throughput.markdown(res))
    if not no_record:
        results.append("edge", [{k: v for k, v in res.items() if k != "machine"}], res["machine"])
    if json_out:
        write_json(json_out, res)


@bench.command("bccd")
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@click.option("--model", type=click.Path(dir_okay=False))
@orientations_option()
@click.option("--white-balance", is_flag=True, help="white-balance the session onto the model's training lamp")
@json_option
def bench_bccd(
    bccd: str | None, model: str | None, orientations: str, white_balance: bool, json_out: str | None
) -> None:
    """Cell finding (recall/precision vs the WBC boxes) and field classification on BCCD."""
    from bmc.benchmarks import detection
    from bmc.benchmarks.generalisation import DEFAULT_BCCD, data_folder

    root = one_line_errors(data_folder, bccd or DEFAULT_BCCD, "--bccd")
    f = one_line_errors(detection.finding, root)
    click.echo(
        f"cell finding: recall {f['recall']:.4f}, precision {f['precision']:.4f} "
        f"({f['boxes']} WBC boxes, {f['found']} cells found, {f['missed']} missed, "
        f"{f['false_positives']} outside any box)"
    )
    c = one_line_errors(detection.field_classification, root, model, int(orientations), white_balance)
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
        write_json(json_out, {"finding": f, "classification": c})


@bench.command("autonomy")
@truth_options
@click.option(
    "--k", default=0, show_default=True, help="fields per class reviewed to adapt (0: the shipped model only)"
)
@seeds_option
@click.option(
    "--calibration",
    default=60,
    show_default=True,
    help="cells of the random calibration order reviewed besides the k per class",
)
@click.option("--mode", type=click.Choice(["field", "cell"]), default="field", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False))
@orientations_option()
@click.option(
    "--days",
    default=0,
    show_default=True,
    help="sessions after the day of review (half the fields; the rest split among them): does the "
    "reference, grown with each session's surely counted cells, count more of the next? (needs --k)",
)
@click.option(
    "--gates",
    is_flag=True,
    help="also search every unknown-cell level and confidence rule on the scored fields: the most "
    "any setting of the gates could count unaided at each balanced accuracy (a ceiling, not a figure to be had)",
)
@json_option
def bench_autonomy(
    source: str,
    truth_file: str,
    k: int,
    seeds: tuple[int, ...],
    calibration: int,
    mode: str,
    model: str | None,
    orientations: str,
    days: int,
    gates: bool,
    json_out: str | None,
) -> None:
    """The share of white cells the device counts with no person, and how right those are: for the
    shipped model and, with --k, after a laboratory's day of review and bmc edge adapt."""
    from bmc.benchmarks import autonomy

    if days:
        if not k:
            raise CliFail("--days needs --k: the first day's review to adapt from")
        if gates:
            raise CliFail("--gates is measured on one day's sessions: leave out --days")
        r = one_line_errors(
            autonomy.sequence,
            source,
            truth_file,
            k,
            seeds,
            days,
            calibration,
            mode,
            model,
            int(orientations),
            log=lambda m: click.echo(m, err=True),
        )
        click.echo(autonomy.sequence_markdown(r))
        if json_out:
            write_json(json_out, r)
        return
    r = one_line_errors(
        autonomy.run,
        source,
        truth_file,
        k,
        seeds,
        calibration,
        mode,
        model,
        int(orientations),
        log=lambda m: click.echo(m, err=True),
        gates=gates,
    )
    click.echo(autonomy.markdown(r))
    if json_out:
        write_json(json_out, r)


@bench.command("adabn")
@click.option(
    "--model", type=click.Path(dir_okay=False), help="the float16 .tflite to recover (default: the shipped one)"
)
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@click.option("--pbc", type=click.Path(file_okay=False), help="the training images (default ../shared/data/pbc)")
@click.option(
    "--first",
    "firsts",
    multiple=True,
    help="lowest layer re-estimated (a block such as block6a, or top; 'stem': all); repeat for several",
)
@click.option("--weight", default=1.0, show_default=True, help="share of the new statistics (with --first)")
@orientations_option()
@json_option
def bench_adabn(
    model: str | None,
    bccd: str | None,
    pbc: str | None,
    firsts: tuple[str, ...],
    weight: float,
    orientations: str,
    json_out: str | None,
) -> None:
    """AdaBN on BCCD: the shipped float model with its batch-norm statistics re-estimated on half the
    fields' cells (no labels), scored on the other half, against the same model without."""
    need_training("bmc bench adabn", "bmc.train.recover", "tensorflow")
    from bmc.benchmarks import adabn
    from bmc.benchmarks.generalisation import DEFAULT_BCCD, DEFAULT_PBC

    variants = tuple((None if f == "stem" else f, weight) for f in firsts) or adabn.VARIANTS
    r = one_line_errors(
        adabn.run,
        model or adabn.DEFAULT_FP16,
        bccd or DEFAULT_BCCD,
        pbc or DEFAULT_PBC,
        variants,
        int(orientations),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(adabn.markdown(r))
    if json_out:
        write_json(json_out, r)


@bench.command("multisource")
@truth_options
@click.option("--split", "split_file", required=True, type=click.Path(dir_okay=False), help="the model's split.json")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for the session, cells and split")
@click.option("--seed", default=1, show_default=True, help="which half of the fields is taught")
@click.option("--repeat", default=5, show_default=True, help="copies of each taught cell in the training part")
@click.option("--model", type=click.Path(dir_okay=False), help="the model the session runs with (default: shipped)")
@click.option(
    "--labels",
    type=click.Choice(["truth", "counted"]),
    default="truth",
    show_default=True,
    help="truth: each field's cell reviewed with its true class; counted: no review, the cells the "
    "device counted unaided as it called them (self-training)",
)
@click.option(
    "--balance/--no-balance",
    default=False,
    show_default=True,
    help="copy each class's cells in inverse proportion to its count, not --repeat times each",
)
@orientations_option("1", "orientations the session classifies each cell in (what --labels counted harvests)")
def bench_multisource(
    source: str,
    truth_file: str,
    split_file: str,
    out: str,
    seed: int,
    repeat: int,
    model: str | None,
    labels: str,
    balance: bool,
    orientations: str,
) -> None:
    """A second training domain from half the fields: a session, each field's cell reviewed with its
    true class (or, with --labels counted, the device's own unaided calls), harvested and added to the
    split's training part; the other half's truth for scoring."""
    from bmc.benchmarks import multisource

    info = one_line_errors(
        multisource.prepare,
        source,
        truth_file,
        split_file,
        out,
        seed,
        repeat,
        model,
        log=lambda m: click.echo(m, err=True),
        labels=labels,
        orientations=int(orientations),
        balance=balance,
    )
    click.echo(json.dumps(info, indent=2))


@bench.command("differential")
@truth_options
@click.option("--model", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["field", "cell"]), default="field", show_default=True)
@orientations_option()
@json_option
def bench_differential(
    source: str, truth_file: str, model: str | None, mode: str, orientations: str, json_out: str | None
) -> None:
    """The session's differential against the true one, per class in percentage points: as the
    device counts alone, and after a simulated reviewer decides every cell set aside."""
    from bmc.benchmarks import differential

    r = one_line_errors(differential.run, source, truth_file, model, mode, int(orientations))
    click.echo(differential.markdown(r))
    if json_out:
        write_json(json_out, r)


@bench.command("pan")
@click.option("--bccd", type=click.Path(file_okay=False), help="BCCD folder (default ../shared/data/bccd)")
@click.option("--speeds", default="4,12,30", show_default=True, help="pixels a frame, comma-separated")
@click.option("--fields", "n_fields", default=6, show_default=True, type=click.IntRange(2, 30))
@click.option("--model", type=click.Path(dir_okay=False))
@orientations_option()
@json_option
def bench_pan(
    bccd: str | None, speeds: str, n_fields: int, model: str | None, orientations: str, json_out: str | None
) -> None:
    """A smear surveyed by moving the stage: BCCD fields side by side panned past the camera as a
    video; the white cells found and their calls against the same fields as stills."""
    from bmc.benchmarks import pan
    from bmc.benchmarks.generalisation import DEFAULT_BCCD, data_folder

    try:
        steps = tuple(int(v) for v in speeds.split(","))
    except ValueError:
        raise click.BadParameter(f"{speeds!r}: pixels a frame, e.g. 4,12,30", param_hint="--speeds") from None
    root = one_line_errors(data_folder, bccd or DEFAULT_BCCD, "--bccd")
    r = one_line_errors(pan.run, root, steps, n_fields, model, int(orientations) if orientations else None)
    click.echo(pan.markdown(r))
    if json_out:
        write_json(json_out, r)


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
@click.option(
    "--session-fields",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="run the fields as sessions of this many fields, each measuring the scale afresh (1: every field "
    "alone; 0: one session of all)",
)
@json_option
def bench_finding(
    source: str,
    boxes: str,
    fmt: str,
    label: str,
    errors: str | None,
    tint: float,
    session_fields: int,
    json_out: str | None,
) -> None:
    """Recall and precision of the cell finder against white-cell boxes in VOC, CSV or YOLO form."""
    from bmc.benchmarks import finding

    r = one_line_errors(
        lambda: finding.finding(
            finding.read_boxes(source, boxes, fmt, label), errors=errors, tint=tint, per_session=session_fields
        )
    )
    click.echo(
        f"cell finding on {r['fields']} fields"
        + (f" tinted {tint:g}" if tint else "")
        + f": recall {r['recall']:.4f}, precision {r['precision']:.4f} "
        f"({r['boxes']} boxes, {r['found']} cells found, {r['missed']} missed, {r['false_finds']} false finds); "
        f"extra detections {r['extra_detections']} ({100 * r['extra_per_box']:.1f}% of boxes), "
        f"merged cells {r['merged_cells']} ({100 * r['merged_per_box']:.1f}%)"
        + (f"; errors in {errors}" if errors else "")
    )
    if json_out:
        write_json(json_out, r)


@bench.command("ood")
@click.option("--model", type=click.Path(dir_okay=False), help="default: the shipped int8")
@click.option(
    "--level",
    type=click.FloatRange(0.9, 0.999),
    default=DEFAULT_LEVEL,
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
@click.option(
    "--calibrate",
    default=0,
    show_default=True,
    help="with --reviewed: this many more BCCD cells, drawn at random, set the threshold as bmc edge adapt's "
    "calibration does (the conformal quantile of their distances, never below the card's)",
)
@json_option
def bench_ood(
    model: str | None,
    level: float,
    data_root: str | None,
    reviewed: int,
    seed: int,
    calibrate: int,
    json_out: str | None,
) -> None:
    """Cells the model does not know: the share set aside as unknown of Munich blasts, artefacts and
    other cells no model here names, and of PBC test and BCCD white cells; accuracy on those counted."""
    from bmc.benchmarks import ood
    from bmc.benchmarks.generalisation import DEFAULT_DATA  # what ood.DEFAULT_DATA is

    r = one_line_errors(
        lambda: ood.run(model, level, data_root or DEFAULT_DATA, reviewed=reviewed, seed=seed, calibrate=calibrate)
    )
    click.echo(ood.markdown(r))
    if json_out:
        write_json(json_out, r)


@bench.command("adapt")
@truth_options
@click.option("--k", default=10, show_default=True, help="fields labelled per class")
@seeds_option
@click.option("--mode", type=click.Choice(["field", "cell"]), default="field", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False), help="base model (default: the shipped int8)")
@orientations_option()
@click.option(
    "--ceiling",
    is_flag=True,
    help="label every field instead: the refit head's cross-validated balanced accuracy, the most "
    "any K can reach with this model's embedding",
)
@json_option
def bench_adapt(
    source: str,
    truth_file: str,
    k: int,
    seeds: tuple[int, ...],
    mode: str,
    model: str | None,
    orientations: str,
    ceiling: bool,
    json_out: str | None,
) -> None:
    """Adaptation as a laboratory lives it: run, label K fields per class, bmc edge adapt, run again;
    balanced accuracy of the fields not labelled, before and after, for each seed."""
    from bmc.benchmarks import adapt as bench

    if ceiling:
        res = one_line_errors(
            bench.ceiling, source, truth_file, mode, model, int(orientations), log=lambda m: click.echo(m, err=True)
        )
        click.echo(
            f"{res['labelled']} of {res['fields']} fields labelled; cross-validated balanced accuracy on "
            f"held-out labelled cells: shipped head {res['shipped']['balanced_accuracy']:.3f}, refit head "
            f"{res['adapted']['balanced_accuracy']:.3f}"
        )
        if json_out:
            write_json(json_out, res)
        return

    res = one_line_errors(
        bench.run,
        source,
        truth_file,
        k,
        seeds,
        mode,
        model,
        int(orientations),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(bench.markdown(res))
    if json_out:
        write_json(json_out, res)


@bench.command("truth")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["bccd", "matek", "split"]), required=True)
@click.option(
    "--split",
    "split_csv",
    type=click.Path(dir_okay=False, exists=True),
    help="with --format split: a model's held-out split (path,label, paths under SOURCE), e.g. "
    "edge_app/models/bmc_pbc8_lite0_test_split.csv",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def bench_truth(source: str, fmt: str, split_csv: str | None, out: str) -> None:
    """Write the file,label truth of SOURCE for bmc bench adapt and autonomy: BCCD's single-white-cell
    fields, the Munich cells whose code the 8 classes name, or (split) a model's held-out cells, with
    SOURCE the data folder their paths start from."""
    from bmc.benchmarks import adapt as bench

    if (fmt == "split") != bool(split_csv):
        raise CliFail("--split FILE goes with --format split, and only with it")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if split_csv:
        n = one_line_errors(bench.write_truth_split, source, split_csv, out)
    else:
        n = one_line_errors(bench.write_truth_bccd if fmt == "bccd" else bench.write_truth_matek, source, out)
    click.echo(f"{n} {'fields' if fmt == 'bccd' else 'cells'} → {out}")


@bench.command("ui")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="a folder of fields to replay")
@click.option("--fps", default=30.0, show_default=True, help="the replayed camera's frame rate")
@click.option("--frames", default=300, show_default=True)
@click.option("--model", type=click.Path(dir_okay=False))
@json_option
def bench_ui(source: str, fps: float, frames: int, model: str | None, json_out: str | None) -> None:
    """The screen's delay and cost: frame-to-viewer latency over the live MJPEG stream, and the
    pipeline's frames/s with the screen and one viewer against headless, on a replayed camera."""
    from bmc.benchmarks import ui

    r = one_line_errors(ui.run, source, fps, frames, model, log=lambda m: click.echo(m, err=True))
    click.echo(ui.markdown(r))
    if json_out:
        write_json(json_out, r)


@bench.command("soak")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="a folder of fields")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="a fresh session folder")
@click.option("--kills", default=100, show_default=True)
@click.option("--max-delay", default=6.0, show_default=True, help="seconds: each kill comes after 0.2..this")
@click.option("--seed", default=0, show_default=True)
@json_option
def bench_soak(source: str, out: str, kills: int, max_delay: float, seed: int, json_out: str | None) -> None:
    """SIGKILL `bmc edge run` KILLS times at random moments, re-running into the same folder; then check
    that no committed frame was lost and every field was counted exactly once."""
    from bmc.benchmarks import soak

    try:
        r = soak.run(source, out, kills, max_delay, seed, log=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise CliFail(str(e)) from e
    click.echo(soak.markdown(r))
    if json_out:
        write_json(json_out, r)
    if (
        r["committed_frames_lost"]
        or r["integrity_failures"]
        or r["fields_recorded_twice"]
        or r["fields_missing"]
        or not r["cells_as_uninterrupted"]
    ):
        raise SystemExit(1)


@bench.command("compare")
@click.argument("items", nargs=-1, required=True, type=click.Path())
@click.option("--data", required=True, type=click.Path(file_okay=False), help="class-folder images to score on")
@click.option("--runs", default=100, show_default=True)
@threads_option
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of accuracy against latency")
@json_option
def bench_compare(
    items: tuple[str, ...], data: str, runs: int, threads: int | None, plot: str | None, json_out: str | None
) -> None:
    """Accuracy and macro-F1 on DATA beside latency and size, for a run's variants or given models."""
    from bmc.benchmarks import compare, results

    res = one_line_errors(compare.run, items, data, runs, threads, plot)
    click.echo(compare.markdown(res))
    results.append("compare", res["rows"], res["machine"])
    if json_out:
        write_json(json_out, res)


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
@threads_option
@json_option
def bench_energy(
    model: str | None, meter: str, runs: int, idle_s: float, threads: int | None, json_out: str | None
) -> None:
    """Joules per inference of MODEL, idle power subtracted, on this device's power meter."""
    import os

    import numpy as np

    from bmc.benchmarks import energy, machine
    from bmc.edge_app import meters  # the meters energy re-exports, by their own module
    from bmc.edge_app.backends.litert import LiteRTBackend
    from bmc.edge_app.classifier import DEFAULT_MODEL

    makers: dict[str, Callable[[], meters.PowerMeter]] = {
        "rapl": meters.RaplMeter,
        "jetson": meters.JetsonMeter,
        "pi5": meters.Pi5PmicMeter,
        "ina260": lambda: meters.INA2xxMeter("ina260"),
        "ina219": lambda: meters.INA2xxMeter("ina219"),
    }
    try:
        if meter == "auto":
            found = meters.find_meters()
            if not found:
                click.echo(
                    "no power meter found on this machine (looked for Intel RAPL, a Jetson INA3221, "
                    "a Raspberry Pi 5 PMIC): energy not measured. Use --meter ina260/ina219 or "
                    "--meter csv:LOG for an external meter."
                )
                return
            m = found[0]
        elif meter.startswith("csv:"):
            m = meters.CsvLogMeter(meter[4:])
        elif meter in makers:
            m = makers[meter]()
        else:
            raise CliFail(f"unknown meter {meter!r}")
    except meters.MeterError as e:
        raise CliFail(str(e)) from e
    b = LiteRTBackend(str(model or DEFAULT_MODEL), threads or os.cpu_count())
    size = b.input_shape[1]
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    try:
        r = energy.joules_per_inference(m, lambda: b.predict(x), runs, idle_s)
    except meters.MeterError as e:
        raise CliFail(str(e)) from e
    r.update(model=str(model or DEFAULT_MODEL), machine=machine.describe())
    click.echo(
        f"{r['meter']}: idle {r['idle_w']:.2f} W, {r['avg_w']:.2f} W while running; "
        f"{1000 * r['joules_per_inference']:.2f} mJ per inference above idle ({runs} inferences)"
    )
    if json_out:
        write_json(json_out, r)

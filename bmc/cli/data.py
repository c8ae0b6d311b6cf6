"""``bmc data``: inspect, split, pack and harvest labelled cell-image data sets."""

from __future__ import annotations

import click

from bmc.cli.common import LABEL_SOURCES, one_line_errors, write_json
from bmc.train.config import default as _td  # every training default, written once (TrainConfig)


@click.group()
def data() -> None:
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
def data_check(data_dir: str, label_from: str, manifest: str | None, json_out: str | None) -> None:
    """Classes and counts, image sizes, unreadable files, duplicates and imbalance of DATA_DIR."""
    from bmc.train.data import check

    report = one_line_errors(check, data_dir, label_from, manifest)
    click.echo(report.table())
    if json_out:
        write_json(json_out, report.to_dict())


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
def data_split(data_dir: str, out: str, label_from: str, manifest: str | None, seed: int, like: str | None) -> None:
    """The stratified, grouped train/val/test split that `bmc train DATA_DIR --seed N` makes, written
    to --out without training: fix the partition once, then train on it with --split."""
    from collections import Counter

    from bmc.train.data import discover, load_split, relabel, save_split, split

    dropped = 0
    if like:
        parts, dropped = one_line_errors(relabel, load_split(like), label_from)
    else:
        parts = one_line_errors(lambda: split(discover(data_dir, label_from, manifest), seed=seed))
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
def data_pack(source: str, dest: str, side: int, quality: int, label_from: str) -> None:
    """A compact WebP copy of SOURCE (a data folder or a split.json) in DEST, to carry to a GPU server.

    From a split.json, DEST/split.json keeps the same partition: `bmc train DEST --split
    DEST/split.json` trains on it."""
    from bmc.train.data import pack

    n, skipped = one_line_errors(pack, source, dest, side, quality, label_from)
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
def data_harvest(
    sessions: tuple[str, ...], dest: str, with_data: str | None, label_from: str, model: str | None
) -> None:
    """The cells a person labelled in edge SESSIONS (bmc edge review) as a training set: DEST/<label>/*.png
    at the trained geometry and DEST/manifest.csv; train with: bmc train DEST --manifest DEST/manifest.csv"""
    from bmc.train.harvest import harvest

    fallback = None
    if model:
        from bmc.card import load_card

        fallback = one_line_errors(load_card, model)[1]
    s = one_line_errors(harvest, sessions, dest, with_data, label_from, fallback)
    for item in s["skipped"]:
        click.echo(f"skipped {item['cell']}: {item['why']}", err=True)
    click.echo(
        f"{s['cells']} reviewed cells written to {dest} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(s["by_label"].items()))
        + ")"
        + (f", with {s['with_data_images']} images of {with_data}" if with_data else "")
        + f"; train with: bmc train {dest} --manifest {dest}/manifest.csv"
    )

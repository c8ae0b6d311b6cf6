"""``bmc convert``: a trained run → TFLite variants, each validated against the float model.

For every variant the run's held-out test split is classified by the Keras float model and by the
``.tflite`` file, in one run: accuracy, macro-F1, per-class recall, top-1 agreement with the float
model and mean absolute difference of the probabilities. The gate fails a variant whose accuracy
drops by more than ``max_drop`` points or any class's recall by more than ``max_class_drop``
points; a failed variant is written but its card says ``deployable: false`` and the command exits
non-zero naming the variant and the classes that regressed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
from pathlib import Path

import numpy as np

from bmc import __version__
from bmc.card import sha256_file, write_card
from bmc.contract import Contract, preprocess, read_image
from bmc.convert import variants as V
from bmc.convert.converter import quantization_error_by_layer, to_tflite
from bmc.convert.embedding import EMBEDDING, PROBABILITIES, read_head
from bmc.convert.gate import Gate  # noqa: F401 - re-exported; its defaults live there, light for the CLI
from bmc.errors import BmcError
from bmc.train.metrics import Metrics, classification_metrics


class GateFailed(BmcError, RuntimeError):
    """At least one variant lost too much accuracy; the message names variants and classes."""


@dataclasses.dataclass
class Source:
    model_path: Path
    contract: Contract
    train: list  # Samples, for calibration
    test: list  # Samples, for validation
    run_dir: Path | None


def resolve_source(source: str | Path, data: str | Path | None = None) -> Source:
    """A run folder (``model.keras``, ``contract.json``, ``split.json``) or a ``.keras`` file."""
    from bmc.train import data as data_mod
    from bmc.train.evaluate import EvaluationError, contract_for

    source = Path(source)
    model_path = source / "model.keras" if source.is_dir() else source
    if not model_path.is_file():
        raise EvaluationError(f"{source}: neither a run folder with model.keras nor a .keras file")
    contract = contract_for(model_path)
    split_file = model_path.parent / "split.json"
    if data is not None:
        samples = data_mod.discover(data)
        parts = data_mod.split(samples) if not split_file.exists() else data_mod.load_split(split_file)
        test = samples if not split_file.exists() else parts["test"]
        train = parts["train"]
    elif split_file.exists():
        parts = data_mod.load_split(split_file)
        train, test = parts["train"], parts["test"]
    else:
        raise EvaluationError(f"{model_path}: no split.json beside it; pass --data DIR with test images")
    return Source(model_path, contract, train, test, model_path.parent if split_file.exists() else None)


def representative_images(samples, contract: Contract, n: int = 200, seed: int = 0) -> np.ndarray:
    """``n`` training images drawn stratified by class, preprocessed exactly as at inference."""
    rng = np.random.default_rng(seed)
    by: dict[str, list] = {}
    for s in samples:
        by.setdefault(s.label, []).append(s)
    per = max(1, math.ceil(n / len(by)))
    xs = []
    for label in sorted(by):
        items = by[label]
        for i in rng.choice(len(items), size=min(per, len(items)), replace=False):
            try:
                xs.append(preprocess(read_image(items[i].path), contract, "BGR"))
            except ValueError:
                continue
    return np.stack(xs)


def load_test(samples, contract):
    index = {l: i for i, l in enumerate(contract.labels)}
    xs, ys = [], []
    for s in samples:
        try:
            xs.append(preprocess(read_image(s.path), contract, "BGR"))
        except ValueError:
            continue
        ys.append(index[s.label])
    return np.stack(xs), np.asarray(ys)


def batched(predict, xs, bs=32):
    return np.concatenate([predict(xs[i : i + bs]) for i in range(0, len(xs), bs)])


def compare(float_probs, probs, y, labels, gate: Gate) -> dict:
    mf = classification_metrics(y, float_probs, labels)
    mv = classification_metrics(y, probs, labels)
    drop = 100 * (mf.accuracy - mv.accuracy)
    class_drops = {c: 100 * (r - mv.recall.get(c, 0.0)) for c, r in mf.recall.items()}
    regressed = sorted(c for c, d in class_drops.items() if d > gate.max_class_drop)
    worst = max(class_drops, key=class_drops.get)
    return {
        "accuracy": mv.accuracy,
        "macro_f1": mv.macro_f1,
        "n": mv.n,
        "per_class_recall": mv.recall,
        "agreement": float((float_probs.argmax(1) == probs.argmax(1)).mean()),
        "mean_abs_prob_diff": float(np.abs(float_probs - probs).mean()),
        "accuracy_drop_points": drop,
        "class_recall_drop_points": class_drops,
        "worst_class": worst,
        "regressed_classes": regressed,
        "passed": bool(drop <= gate.max_drop and not regressed),
        "metrics": mv,
    }


def convert_run(
    source,
    out_dir,
    name: str = "bmc",
    variant_names=("float32", "float16", "dynamic", "int8"),
    gate: Gate = Gate(),
    data=None,
    n_representative: int = 200,
    diagnose: bool = True,
    float_layers: tuple[str, ...] | str = (),
    log=print,
) -> dict:
    import keras

    src = resolve_source(source, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = keras.models.load_model(src.model_path)
    float_sha = sha256_file(src.model_path)
    labels = list(src.contract.labels)
    log(f"validation set: {len(src.test)} images; calibration from {len(src.train)} training images")
    xs, y = load_test(src.test, src.contract)
    float_probs = batched(lambda b: model.predict(b, verbose=0), xs)
    float_metrics = classification_metrics(y, float_probs, labels)
    log(f"keras float: accuracy {float_metrics.accuracy:.4f}, macro-F1 {float_metrics.macro_f1:.4f}")
    rep = representative_images(src.train, src.contract, n_representative) if "int8" in variant_names else None

    rows, failed = [], []
    for vname in variant_names:
        v = V.variant(vname)
        q = {"float32": V.float32, "float16": V.float16, "dynamic": V.dynamic}.get(vname)
        q = q() if q else V.int8(rep, float_layers if isinstance(float_layers, tuple) else ())
        build = functools.partial(
            _build_and_validate,
            path=out / f"{name}{v.suffix}",
            xs=xs,
            y=y,
            float_probs=float_probs,
            labels=labels,
            gate=gate,
            log=log,
        )
        row = build(model, q)
        if vname == "int8" and not row["passed"] and (diagnose or float_layers == "auto"):
            row = _int8_retry(model, q, row, rep, build, retry=float_layers == "auto", log=log)
        _write_variant_card(out / f"{name}{v.suffix}", v, row, src, float_sha, float_metrics, gate)
        rows.append(row)
        if not row["passed"]:
            failed.append(row)

    report = _conversion_report(src, float_sha, float_metrics, gate, len(y), rows)
    (out / f"{name}_conversion.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}_conversion.md").write_text(report_markdown(report))
    if failed:
        raise GateFailed(failure_message(failed, gate, out / f"{name}_conversion.md"))
    return report


def _conversion_report(
    src: Source, float_sha: str, float_metrics: Metrics, gate: Gate, n: int, rows: list[dict]
) -> dict:
    """What ``<name>_conversion.json`` holds: the source, the gate, the float model's figures and each variant's."""
    return {
        "source_model": str(src.model_path),
        "source_sha256": float_sha,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gate": dataclasses.asdict(gate),
        "n": int(n),
        "float": {
            "accuracy": float_metrics.accuracy,
            "macro_f1": float_metrics.macro_f1,
            "per_class_recall": float_metrics.recall,
        },
        "variants": [{k: v for k, v in r.items() if k != "metrics"} for r in rows],
    }


_FIRST_ATTEMPT_KEYS = (
    "accuracy",
    "macro_f1",
    "agreement",
    "accuracy_drop_points",
    "regressed_classes",
    "class_recall_drop_points",
    "worst_layers",
)


def _int8_retry(model, q, row, rep, build, retry: bool, log) -> dict:
    """An int8 variant that failed its gate: the layers that quantise worst, by rmse over scale,
    recorded in its row; with ``retry``, int8 again with those beyond 0.7 (at most 10) kept in
    float, the full-int8 attempt kept beside it."""
    worst = quantization_error_by_layer(model, q, rep[:32])
    row["worst_layers"] = worst
    log(
        "int8 failed its gate; worst layers by rmse/scale: "
        + ", ".join(f"{w['tensor']} ({w['rmse_over_scale']:.2f})" for w in worst[:5])
    )
    if not retry:
        return row
    keep = tuple(w["tensor"] for w in worst if w["rmse_over_scale"] > 0.7)[:10]
    log(f"retrying int8 with {len(keep)} layer(s) kept in float")
    second = build(model, V.int8(rep, keep))
    second["float_layers"] = list(keep)
    second["full_int8_attempt"] = {k: row[k] for k in _FIRST_ATTEMPT_KEYS}
    return second


def failure_message(failed: list[dict], gate: Gate, report_path: Path) -> str:
    """One line naming each failed variant, its accuracy drop and the classes that regressed."""

    def one(r):
        classes = ", ".join(f"{c} (-{r['class_recall_drop_points'][c]:.1f})" for c in r["regressed_classes"])
        return (
            f"variant {r['variant']} failed the gate: accuracy drop {r['accuracy_drop_points']:.2f} points "
            f"(max {gate.max_drop})" + (f", classes regressed: {classes}" if classes else "")
        )

    return "; ".join(one(r) for r in failed) + f" — not marked deployable; see {report_path}"


def _build_and_validate(model, q, *, path: Path, xs, y, float_probs, labels, gate, log) -> dict:
    from bmc.convert.embedding import add_embedding_output
    from bmc.edge_app.backends.litert import LiteRTBackend

    log(f"converting {q.variant.name} …")
    # the cell embedding beside the class scores (for adaptation on the device): same ops, same scores
    path.write_bytes(add_embedding_output(to_tflite(model, q), str(path)))
    probs = batched(LiteRTBackend(str(path)).predict, xs)
    row = {
        "variant": q.variant.name,
        "format": q.variant.format,
        "file": path.name,
        "size_mb": path.stat().st_size / 1e6,
        **compare(float_probs, probs, y, labels, gate),
    }
    log(
        f"{q.variant.name}: {row['size_mb']:.2f} MB, accuracy {row['accuracy']:.4f} "
        f"(drop {row['accuracy_drop_points']:+.2f}), agreement {row['agreement']:.4f}, "
        f"{'PASS' if row['passed'] else 'FAIL'}"
    )
    return row


def validation_section(row: dict, gate: Gate, float_metrics: Metrics, data: str) -> dict:
    """A converted file's card ``validation``: its gate row against the float model (TFLite and ONNX alike)."""
    gated = ("passed", "accuracy", "macro_f1", "agreement", "mean_abs_prob_diff", "accuracy_drop_points")
    return {
        "data": data,
        "n": row["n"],
        "gate": dataclasses.asdict(gate),
        **{k: row[k] for k in gated},
        "per_class_recall": row["per_class_recall"],
        "worst_class": row["worst_class"],
        "float_accuracy": float_metrics.accuracy,
        "float_macro_f1": float_metrics.macro_f1,
        **({"float_layers": row["float_layers"]} if row.get("float_layers") else {}),
    }


def _write_variant_card(path, v, row, src: Source, float_sha, float_metrics, gate):
    write_card(
        path,
        {
            "name": path.stem,
            "variant": v.name,
            "format": v.format,
            "description": v.description
            if not row.get("float_layers")
            else f"uint8 in/out; int8 ops except {len(row['float_layers'])} layer(s) kept in float (selective quantization)",
            "int8_only": v.name == "int8" and not row.get("float_layers"),
            "bmc_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "contract": src.contract.to_dict(),
            "outputs": [PROBABILITIES, EMBEDDING],
            "embedding": {"size": int(read_head(path)[0].shape[0]), "pooled": "global average"},
            "source_model": {"file": src.model_path.name, "sha256": float_sha},
            "validation": validation_section(
                row, gate, float_metrics, "held-out test split of the training run" if src.run_dir else "given data"
            ),
            "deployable": row["passed"],
        },
    )


def report_markdown(report: dict) -> str:
    g = report["gate"]
    lines = [
        f"# Conversion report — {Path(report['source_model']).name}",
        "",
        f"Source sha256 `{report['source_sha256'][:16]}…`, validated on n = {report['n']} held-out images. "
        f"Gate: accuracy drop ≤ {g['max_drop']} points, every class's recall drop ≤ {g['max_class_drop']} points.",
        "",
        "| variant | file | size (MB) | accuracy | macro-F1 | agreement | mean abs Δp | drop (pts) | worst class | gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        f"| keras float | — | — | {report['float']['accuracy']:.4f} | {report['float']['macro_f1']:.4f} | 1.0000 | 0 | 0 | — | — |",
    ]
    for r in report["variants"]:
        wc = r["worst_class"]
        lines.append(
            f"| {r['variant']} | {r['file']} | {r['size_mb']:.2f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['agreement']:.4f} | {r['mean_abs_prob_diff']:.4f} | {r['accuracy_drop_points']:+.2f} | "
            f"{wc} ({0.0 - r['class_recall_drop_points'][wc]:+.1f}) | {'PASS' if r['passed'] else '**FAIL**'} |"
        )
    lines += [
        "",
        "Per-class recall:",
        "",
        "| class | float | " + " | ".join(r["variant"] for r in report["variants"]) + " |",
        "|---|---:|" + "---:|" * len(report["variants"]),
    ]
    for c, rec in report["float"]["per_class_recall"].items():
        lines.append(
            f"| {c} | {rec:.3f} | "
            + " | ".join(f"{r['per_class_recall'].get(c, 0):.3f}" for r in report["variants"])
            + " |"
        )
    for r in report["variants"]:
        a = r.get("full_int8_attempt")
        if a:
            lines += [
                "",
                f"**{r['variant']}: selective quantization.** Full-integer int8 failed the gate "
                f"(accuracy {a['accuracy']:.4f}, drop {a['accuracy_drop_points']:+.2f} points; regressed: "
                + (", ".join(f"{c} −{a['class_recall_drop_points'][c]:.1f}" for c in a["regressed_classes"]) or "none")
                + f"). The {len(r['float_layers'])} layer(s) with the largest quantization "
                "error (rmse/scale > 0.7) were kept in float and the variant validated again (the row above). "
                "It still takes uint8 pixels and gives uint8 scores, but is not an int8-only graph "
                "(no Edge TPU):",
                "",
            ]
            lines += [f"- `{t.split(';')[0]}`" for t in r["float_layers"]]
        wl = r.get("worst_layers") or (a or {}).get("worst_layers")
        if wl:
            lines += ["", "Worst int8 layers by rmse/scale (1/sqrt(12) ≈ 0.29 is rounding alone):", ""]
            lines += [f"- `{w['tensor'].split(';')[0]}` ({w.get('op', '')}): {w['rmse_over_scale']:.2f}" for w in wl]
    return "\n".join(lines) + "\n"

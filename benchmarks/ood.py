"""Cells the model does not know: how many the unknown-cell check sets aside, where it should and
where it should not (``bmc bench ood``).

Every cell goes through the device's path (the model with its embedding, the orientations the
app uses, :mod:`bmc.edge_app.unknown` at a level) and is either counted or set aside as unknown:

* **should be set aside** — the Munich bone-marrow cells no model of the kit can name: blasts
  (BLA), artefacts (ART), plasma cells, proerythroblasts, unidentifiable cells (PLM, PEB, NIF);
* **should be counted** — the model's own held-out PBC test cells (same microscope), the Munich
  cells it can name, and the BCCD white cells (another microscope, another stain).

For each set: the share set aside, and the accuracy on the cells counted beside the accuracy on
all of them (the check is worth its set-aside cells when the counted ones are the right ones). A
sweep over the card's calibration levels shows the trade a laboratory makes with
``[review] unknown_level``.

    bmc bench ood [--model M] [--level 0.98] [--json OUT]
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bmc.benchmarks.generalisation import DEFAULT_DATA, MATEK_UNKNOWN, bccd_cells, data_folder, matek_cells, matek_map
from bmc.card import ModelCard
from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS
from bmc.edge_app.unknown import DEFAULT_LEVEL, UnknownCells, threshold_at
from bmc.errors import BmcError

SHOULD_FLAG = {"blasts (BLA)": ("BLA",), "artefacts (ART)": ("ART",), "PLM/PEB/NIF": ("PLM", "PEB", "NIF")}
# the targets: (set, bound) — set aside at least / at most this share
TARGETS = {
    "blasts (BLA)": (">=", 5 / 7),
    "artefacts (ART)": (">=", 0.80),
    "PBC test": ("<=", 0.03),
    "BCCD white cells": ("<=", 0.15),
}


class OodError(BmcError, ValueError):
    """A benchmark that cannot run as asked; the message says why."""


def test_cells(model_path: Path, card: ModelCard, data_root: Path):
    """(paths, labels) of the model's held-out test split shipped beside it (``<name>_test_split.csv``)."""
    name = card.name
    for suffix in ("_int8", "_fp16", "_float16", "_dynamic", "_fp32", "_onnx-int8", "_onnx-fp32"):
        name = name.removesuffix(suffix)
    path = model_path.parent / f"{name}_test_split.csv"
    if not path.is_file():
        raise OodError(f"{path}: no held-out test split beside the model (its PBC test cells)")
    rows = list(csv.DictReader(open(path, newline="")))
    return [str(data_root / r["path"]) for r in rows], [r["label"] for r in rows]


def _embed(clf, xs: np.ndarray, batch: int = 32):
    probs, embs = [], []
    for i in range(0, len(xs), batch):
        p, e = clf.predict_cells(xs[i : i + batch].astype(np.float32))
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs), np.concatenate(embs)


def _accuracy(y_true, probs, labels, parents, keep=None) -> dict:
    """Accuracy and balanced accuracy at the model's level and at the 8-class level."""
    keep = np.ones(len(y_true), bool) if keep is None else keep
    out = {"n": int(keep.sum())}
    if not keep.any():
        return out
    pred = np.array(labels)[probs.argmax(1)]
    coarse_pred = np.array([parents.get(p, p) for p in pred])
    coarse_true = np.array([parents.get(t, t) for t in y_true])
    for level, t, p in (("", np.asarray(y_true), pred), ("coarse_", coarse_true, coarse_pred)):
        t, p = t[keep], p[keep]
        out[f"{level}accuracy"] = float((t == p).mean())
        classes = sorted(set(t))
        out[f"{level}balanced_accuracy"] = float(np.mean([(p[t == c] == c).mean() for c in classes]))
    return out


def run(
    model=None,
    level: float = DEFAULT_LEVEL,
    data_root=DEFAULT_DATA,
    orientations: int = DEFAULT_ORIENTATIONS,
    threads: int | None = None,
    reviewed: int = 0,
    seed: int = 0,
    calibrate: int = 0,
) -> dict:
    """The set-aside shares and accuracies of ``model`` (default: the shipped int8) at ``level``.

    ``reviewed`` > 0 plays a laboratory that adapted the model at the BCCD microscope: that many BCCD
    white cells per class (drawn with ``seed``) join the reference, as ``bmc edge adapt`` adds a
    laboratory's reviewed cells, and the BCCD figures are of the other cells."""
    import os

    from bmc.contract import preprocess, read_image
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

    model = Path(model or DEFAULT_MODEL)
    clf = CellClassifier(model, threads=threads or os.cpu_count(), orientations=orientations)
    if clf.unknown is None:
        raise OodError(f"{model}: its card has no unknown-cell calibration (bmc prepare-adapt MODEL --split SPLIT)")
    detector = clf.unknown.at(level)
    contract, labels = clf.contract, clf.labels
    parents = dict(contract.parents or {})
    data_root = data_folder(data_root, "--data")

    sets = {}
    paths, y = test_cells(model, clf.card, data_root)
    xs = np.stack([preprocess(read_image(p), contract, "BGR", crop=True) for p in paths])
    sets["PBC test"] = (y, *_embed(clf, xs))
    xs, y = bccd_cells(data_root / "bccd", contract)
    by, bp, be = y, *_embed(clf, xs)
    if reviewed:
        rng = np.random.default_rng(seed)
        pick = np.zeros(len(by), bool)
        for label in sorted(set(by)):
            idx = np.flatnonzero(np.array(by) == label)
            pick[rng.choice(idx, min(reviewed, len(idx) - 1), replace=False)] = True
        cal = np.zeros(len(by), bool)
        if calibrate:  # a random sample of the other cells, reviewed too: the laboratory's threshold
            rest = np.flatnonzero(~pick)
            cal[rng.choice(rest, min(calibrate, len(rest) - 1), replace=False)] = True
        reference = np.concatenate([detector.reference, be[pick | cal]])
        detector = UnknownCells(reference, clf.unknown.calib, level)
        if calibrate:
            from bmc.edge_app.calibration import conformal_quantile
            from bmc.edge_app.unknown import distances

            own = np.flatnonzero(cal)
            others = np.concatenate([clf.unknown.reference, be[pick]])
            d = np.array([distances(be[i][None], np.concatenate([others, be[own[own != i]]]))[0] for i in own])
            detector.threshold = max(float(detector.threshold), conformal_quantile(d, level))
        pick |= cal
        by, bp, be = [l for l, k in zip(by, pick) if not k], bp[~pick], be[~pick]
    sets["BCCD white cells"] = (by, bp, be)
    known = matek_map(labels)
    codes = {**{c: c for c in known}, **{c: c for c in MATEK_UNKNOWN}}
    xs, code = matek_cells(data_root / "matek-bm-samples", contract, codes)
    code = np.array(code)
    mp, me = _embed(clf, xs)

    grid = [q for q, _ in clf.unknown.calib["levels"]]
    scores = {k: detector.scores(e) for k, (_, _, e) in sets.items()}
    mscores = detector.scores(me)

    def share(s, thr):
        return float((s > thr).mean()) if len(s) else None

    out = {
        "model": str(model),
        "level": level,
        "reviewed_bccd_per_class": reviewed,
        "lab_calibration_cells": calibrate if reviewed else 0,
        "seed": seed,
        "threshold": detector.threshold,
        "score": clf.unknown.calib["score"],
        "reference_cells": int(len(detector.reference)),
        "orientations": orientations,
        "sets": {},
        "munich": {},
        "sweep": [],
    }
    for name, (y, p, _) in sets.items():
        flagged = scores[name] > detector.threshold
        out["sets"][name] = {
            "n": len(y),
            "set_aside": float(flagged.mean()),
            "all": _accuracy(y, p, labels, parents),
            "counted": _accuracy(y, p, labels, parents, ~flagged),
        }
    for c in sorted(set(code)):
        s = mscores[code == c]
        out["munich"][c] = {
            "n": int(len(s)),
            "set_aside": share(s, detector.threshold),
            "name": MATEK_UNKNOWN.get(c, known.get(c)),
        }
    for name, group in SHOULD_FLAG.items():
        s = mscores[np.isin(code, group)]
        out["sets"][name] = {"n": int(len(s)), "set_aside": share(s, detector.threshold)}
    named = np.isin(code, list(known))
    if named.any():
        y = [known[c] for c in code[named]]
        flagged = mscores[named] > detector.threshold
        out["sets"]["Munich cells it can name"] = {
            "n": int(named.sum()),
            "set_aside": float(flagged.mean()),
            "all": _accuracy(y, mp[named], labels, parents),
            "counted": _accuracy(y, mp[named], labels, parents, ~flagged),
        }
    for q in grid:
        thr = threshold_at(clf.unknown.calib, q)
        row = {"level": q, "threshold": thr}
        row.update({name: share(scores[name], thr) for name in sets})
        row.update({name: share(mscores[np.isin(code, g)], thr) for name, g in SHOULD_FLAG.items()})
        out["sweep"].append(row)
    out["targets"] = {
        name: {
            "bound": f"{op} {bound:.0%}",
            "set_aside": out["sets"][name]["set_aside"],
            "met": bool(
                out["sets"][name]["set_aside"] >= bound if op == ">=" else out["sets"][name]["set_aside"] <= bound
            ),
        }
        for name, (op, bound) in TARGETS.items()
    }
    return out


def markdown(r: dict) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lab = (
        f"; {r['reviewed_bccd_per_class']} BCCD cells per class reviewed as a laboratory would (seed {r['seed']}) "
        "join the reference, BCCD figures are of the others"
        if r.get("reviewed_bccd_per_class")
        else ""
    )
    lines = [
        f"Unknown-cell check of `{Path(r['model']).name}` at level {r['level']} (threshold "
        f"{r['threshold']:.4f}; {r['reference_cells']} reference cells; {r['orientations']} orientations{lab})",
        "",
        "| cells | n | set aside | accuracy, all | accuracy, counted | balanced acc., all | balanced acc., counted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["sets"].items():
        a, c = s.get("all", {}), s.get("counted", {})
        key = "coarse_" if name != "PBC test" else ""
        lines.append(
            f"| {name} | {s['n']} | {pct(s['set_aside'])} | {pct(a.get(key + 'accuracy'))} | "
            f"{pct(c.get(key + 'accuracy'))} | {pct(a.get(key + 'balanced_accuracy'))} | "
            f"{pct(c.get(key + 'balanced_accuracy'))} |"
        )
    lines += [
        "",
        "Munich codes: " + ", ".join(f"{c} {m['n']} ({pct(m['set_aside'])})" for c, m in r["munich"].items()),
        "",
        "Targets: "
        + "; ".join(
            f"{k} {v['bound']}: {pct(v['set_aside'])} {'met' if v['met'] else 'NOT met'}"
            for k, v in r["targets"].items()
        ),
        "",
        "Sweep over the card's levels (share set aside):",
        "",
        "| level | threshold | " + " | ".join(k for k in r["sweep"][0] if k not in ("level", "threshold")) + " |",
        "|---:|---:|" + "---:|" * (len(r["sweep"][0]) - 2),
    ]
    for row in r["sweep"]:
        lines.append(
            f"| {row['level']} | {row['threshold']:.4f} | "
            + " | ".join(pct(v) for k, v in row.items() if k not in ("level", "threshold"))
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--reviewed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    r = run(a.model, a.level, a.data, reviewed=a.reviewed, seed=a.seed)
    print(markdown(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

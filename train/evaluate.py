"""``bmc evaluate``: a ``.keras`` or ``.tflite`` model on a class-folder data set.

The model's labels and preprocessing come from its contract — ``contract.json`` beside a
``.keras`` file (the run folder) or the model card of a ``.tflite`` file — never from the data.
Data folders are matched to the model's labels case-insensitively (``Neutrophil`` → ``neutrophil``);
a folder whose label the model does not know is an error that lists them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from bmc.contract import Contract, preprocess, read_image
from bmc.edge_app.classifier import predict_oriented
from bmc.edge_app.differential import ReviewPolicy
from bmc.errors import BmcError
from bmc.stages import coarse_labels, coarse_probs, stage_distance
from bmc.train import data as data_mod
from bmc.train.metrics import Metrics, classification_metrics, per_class_table, plot_confusion


class EvaluationError(BmcError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class UnknownSetAside:
    """The unknown-cell check of a ``.tflite`` model's card, applied to a labelled set."""

    level: str
    threshold: float
    set_aside: float  # share of the images set aside as unknown
    accuracy_all: float
    accuracy_counted: float  # on the images it lets through


@dataclasses.dataclass
class Evaluation:
    """``bmc evaluate`` and a training run's test figures: the metrics at the level the data is
    labelled at, and what the edge app would do with the same images."""

    metrics: Metrics
    level: str  # "model", or "8-class (the stages summed)" for a stage model on 8-class data
    set_aside: float  # share the edge app's review policy would set aside
    counted_accuracy: float  # accuracy of the rest
    skipped: list[dict]  # {"path", "why"} of each unreadable image, left out of the figures
    coarse: Metrics | None = None  # a stage model on stage-labelled data: the 8-class level
    stage_errors: dict[str, int] | None = None  # its errors by how far they miss
    unknown: UnknownSetAside | None = None
    model: str | None = None
    orientations: int | None = None
    data: str | None = None
    train_seconds: float | None = None

    def to_dict(self) -> dict:
        """The ``metrics.json`` layout: the metrics' figures at the top level, then the rest that is known."""
        d = self.metrics.to_dict()
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if isinstance(v, Metrics):
                v = v.to_dict()
            elif isinstance(v, UnknownSetAside):
                v = dataclasses.asdict(v)
            if v is not None:
                d[f.name] = v
        return d


def contract_for(model_path: Path) -> Contract:
    """The contract of a ``.keras`` model: ``contract.json`` of its run folder."""
    candidates = [model_path.parent / "contract.json"]
    for c in candidates:
        if c.is_file():
            d = json.loads(c.read_text())
            return Contract.from_dict(d.get("contract", d) if isinstance(d, dict) else d)
    raise EvaluationError(
        f"{model_path}: no contract found (looked for {', '.join(str(c) for c in candidates)}); "
        "a model is only usable with the contract written by 'bmc train' or 'bmc convert'"
    )


class KerasClassifier:
    def __init__(self, model_or_path):
        if isinstance(model_or_path, (str, Path)):
            import keras

            model_or_path = keras.models.load_model(model_or_path)
        self.model = model_or_path

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(batch, verbose=0, batch_size=len(batch)))


class TFLiteClassifier:
    """A ``.tflite`` model through the edge app's classifier (the same code the device runs: the
    card's outputs checked, an adapted model's head applied), one orientation per call."""

    def __init__(self, path, threads: int | None = None):
        from bmc.edge_app.classifier import CellClassifier

        self.clf = CellClassifier(path, threads, require_deployable=False, orientations=1)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.clf.predict(batch)


def load_classifier(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: model file not found")
    if path.suffix == ".keras":
        return KerasClassifier(path), contract_for(path)
    if path.suffix == ".tflite":
        clf = TFLiteClassifier(path)
        return clf, clf.clf.contract
    raise EvaluationError(f"{path}: unsupported model format {path.suffix!r} (use .keras or .tflite)")


def match_labels(data_labels, model_labels) -> dict[str, str]:
    """Map data folder names to model labels case-insensitively; unknown ones are an error."""
    lower = {l.lower(): l for l in model_labels}
    unknown = sorted(l for l in data_labels if l.lower() not in lower)
    if unknown:
        raise EvaluationError(
            f"label(s) not known to the model: {', '.join(unknown)}; the model knows {', '.join(model_labels)}"
        )
    return {l: lower[l.lower()] for l in data_labels}


def evaluate_samples(model, contract: Contract, samples, batch_size: int = 32, orientations: int = 1) -> Evaluation:
    """Metrics over ``samples``; ``orientations`` > 1 averages each image over that many rotations /
    mirror images, as the edge app does (:func:`bmc.edge_app.classifier.predict_oriented`).

    A stage model (``contract.parents``) is scored at both levels: its own labels, and the 8 classes
    its stages sum into, with how many of its stage errors are one stage off; data labelled with
    the 8 classes only (PBC's class folders) is scored at that level. A ``.tflite`` model whose card
    calibrates the unknown-cell check also reports the share it sets aside and the accuracy of the
    rest."""
    clf = model if hasattr(model, "predict") and not hasattr(model, "layers") else KerasClassifier(model)
    labels = list(contract.labels)
    data_labels = sorted({s.label for s in samples})
    coarse = coarse_labels(labels, contract.parents) if contract.parents else None
    at_coarse = (
        bool(coarse)
        and not {l.lower() for l in data_labels} <= {l.lower() for l in labels}
        and {l.lower() for l in data_labels} <= {l.lower() for l in coarse}
    )
    mapping = match_labels(data_labels, coarse if at_coarse else labels)
    index = {l: i for i, l in enumerate(coarse if at_coarse else labels)}
    detector = getattr(getattr(clf, "clf", None), "unknown", None)
    probs, embs, ys, skipped = [], [], [], []
    for start in range(0, len(samples), batch_size):
        xs = []
        for s in samples[start : start + batch_size]:
            try:
                xs.append(preprocess(read_image(s.path), contract, "BGR"))
                ys.append(index[mapping[s.label]])
            except ValueError as e:
                skipped.append({"path": s.path, "why": str(e)})
        if xs and detector is not None:  # the device's classifier: probabilities and embedding together
            clf.clf.orientations = orientations
            p, e = clf.clf.predict_cells(np.stack(xs))
            probs.append(p)
            embs.append(e)
        elif xs:
            probs.append(predict_oriented(clf.predict, np.stack(xs), orientations))
    if not ys:
        raise EvaluationError("no readable images to evaluate")
    probs, ys = np.concatenate(probs), np.asarray(ys)
    if at_coarse:
        probs = coarse_probs(probs, labels, contract.parents)[0]
        labels = list(coarse)
    m = classification_metrics(ys, probs, labels)
    coarse_m = stage_errors = None
    if coarse and not at_coarse:
        cp, _ = coarse_probs(probs, labels, contract.parents)
        cy = np.array([coarse.index(contract.parents.get(labels[y], labels[y])) for y in ys])
        coarse_m = classification_metrics(cy, cp, list(coarse))
        stage_errors = stage_error_summary(ys, probs.argmax(1), labels)
    unknown = None
    if detector is not None:
        flagged = detector.scores(np.concatenate(embs)) > detector.threshold
        kept = ~flagged
        unknown = UnknownSetAside(
            level=detector.level,
            threshold=detector.threshold,
            set_aside=float(flagged.mean()),
            accuracy_all=m.accuracy,
            accuracy_counted=float((probs[kept].argmax(1) == ys[kept]).mean()) if kept.any() else 0.0,
        )
    # the edge app's review policy: the share it would set aside, and how right the rest is
    sure = np.array([not ReviewPolicy().flag(p) for p in probs])
    return Evaluation(
        metrics=m,
        level="8-class (the stages summed)" if at_coarse else "model",
        set_aside=float(1 - sure.mean()),
        counted_accuracy=float((probs[sure].argmax(1) == ys[sure]).mean()) if sure.any() else 0.0,
        skipped=skipped,
        coarse=coarse_m,
        stage_errors=stage_errors,
        unknown=unknown,
    )


def stage_error_summary(y_true: np.ndarray, y_pred: np.ndarray, labels) -> dict:
    """The errors of a stage model by how far they miss: one stage off in the granulocytic series
    (neighbours that experts also disagree on), further along it, or across classes."""
    out = {"errors": 0, "one_stage_off": 0, "further_in_series": 0, "other": 0}
    for t, p in zip(y_true, y_pred):
        if t == p:
            continue
        out["errors"] += 1
        d = stage_distance(labels[t], labels[p])
        out["one_stage_off" if d == 1 else "further_in_series" if d else "other"] += 1
    return out


def evaluate(
    model_path: str | Path,
    data_dir: str | Path | None,
    label_from: str = "folder",
    split_file: str | Path | None = None,
    part: str = "test",
    orientations: int = 1,
) -> Evaluation:
    """Metrics of a model on a class-folder data set, or on one part of a saved split."""
    clf, contract = load_classifier(model_path)
    if split_file is not None:
        parts = data_mod.load_split(split_file)
        if not parts.get(part):
            raise EvaluationError(f"{split_file}: the split has no {part!r} images")
        samples = parts[part]
    else:
        samples = data_mod.discover(data_dir, label_from)
    data = f"{split_file} ({part})" if split_file is not None else str(data_dir)
    ev = evaluate_samples(clf, contract, samples, orientations=orientations)
    return dataclasses.replace(ev, model=str(model_path), orientations=orientations, data=data)


def write_reports(ev: Evaluation, out: Path, title: str = "") -> None:
    """``metrics.json``, ``per_class.md`` and ``confusion.png`` of an evaluation, in ``out``."""
    out = Path(out)
    (out / "metrics.json").write_text(json.dumps(ev.to_dict(), indent=2))
    (out / "per_class.md").write_text(f"# {title}\n\n" + per_class_table(ev.metrics) + "\n")
    plot_confusion(ev.metrics, str(out / "confusion.png"), title)

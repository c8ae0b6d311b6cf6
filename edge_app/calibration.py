"""Gates calibrated at the laboratory's own microscope, and the error rate they come with.

A cell is counted with no person when two gates let it through: the unknown-cell check (its
embedding lies within a distance of the reference, :mod:`bmc.edge_app.unknown`) and the
confidence rule (its top class probability). Both ship calibrated on the training laboratory's
validation cells, whose microscope is not the clinic's: there, every cell lies further from the
reference and most are set aside. A laboratory calibrates them on its own cells.

The cells must be a **random** sample, reviewed whatever the model said of them: cells chosen
because the model was unsure (``review --for-adapt``) would make any error estimate optimistic.
:func:`calibration_order` deals every recorded cell of a session into one fixed random order (seeded
by the session's start); ``bmc edge review --for-calibration`` lists it, and the calibration sample
is the longest *prefix* of that order whose every cell a person decided (named, or rejected as not
a cell) — so no choice of which cells to review can bias it.

On that sample (split-conformal, Vovk et al.; Angelopoulos & Bates 2021):

* the unknown-cell threshold stays the card's: the laboratory's reviewed cells join the reference
  instead (:mod:`bmc.edge_app.unknown`). The conformal quantile, at the configured level, of the
  sample's distances (each cell's own field left out of the reference) is recorded beside it: raised
  to it, the threshold let the Munich blasts and artefacts through at BCCD;
* the confidence threshold is the lowest top-class probability at which the cells that pass both
  gates are wrong at most ``target_error`` of the time (a rejected cell, or one of a class the
  model does not know, that passes counts as wrong);
* the statement: of the sample's cells that pass, the share right, with its exact 95% interval
  (Clopper-Pearson) and the number of cells it rests on. The threshold is chosen on the same cells,
  where their error first falls within the target: scored on them, the rule looks better than it is
  (seed 3 of BCCD stated 96%, 88–99%, and counted 87% right on the fields not reviewed). So each
  cell is judged by the threshold chosen on the *other* cells (leave-one-out): the statement is of
  the way the gate is chosen, as a new cell will meet it.

The probabilities must be ones the head was not fitted on (:func:`bmc.edge_app.adapt.adapt`'s
cross-validation gives them). Numpy only: the device computes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from bmc.edge_app.differential import ReviewPolicy, count_interval
from bmc.edge_app.unknown import DEFAULT_LEVEL

#: the confidence thresholds tried, lowest first
CONFIDENCE_GRID = tuple(round(0.40 + 0.01 * i, 2) for i in range(60))  # 0.40 … 0.99
MIN_CELLS = 20  # fewer random reviewed cells than this calibrate nothing
MIN_PASSED = 10  # an error rate is judged on at least this many cells let through


def session_seed(folder_name: str, session_id: int, started: str) -> str:
    """What fixes a session's calibration order: its folder's name, its id and its start."""
    return f"{folder_name}|{session_id}|{started}"


def calibration_order(cell_ids: list[int], seed_text: str) -> list[int]:
    """Every cell of a session in one fixed random order: the order a person reviews the
    calibration sample in. ``seed_text``: something fixed about the session (its start time)."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    order = sorted(cell_ids)
    rng = np.random.default_rng(seed)
    return [order[i] for i in rng.permutation(len(order))]


def decided_prefix(order: list[int], decided: set[int]) -> list[int]:
    """The longest prefix of ``order`` whose every cell was decided: the random sample."""
    out = []
    for cid in order:
        if cid not in decided:
            break
        out.append(cid)
    return out


@dataclasses.dataclass(frozen=True)
class LabCalibration:
    """The gates a laboratory's random reviewed cells set, and what they promise."""

    cells: int  # the random reviewed cells it rests on
    level: float  # the share of the laboratory's known cells the unknown-cell check passes
    unknown_threshold: float | None  # None: the check is off
    lab_unknown_quantile: float | None  # the laboratory's conformal quantile of its cells' scores (a record)
    min_confidence: float
    target_error: float
    # of the cells, those both gates let through into the differential (counted with no person), each
    # by the threshold the other cells chose (leave-one-out), and of those the ones right
    passed: int
    correct: int
    counted_share: float  # the share of the cells the chosen rule itself lets through (not leave-one-out)
    # False: at no confidence were the sample's cells within target_error; the device's own rule
    # (ReviewPolicy's min_confidence) is kept, and the statement gives the error it has instead
    target_met: bool = True

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.passed if self.passed else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The exact 95% interval of that accuracy."""
        return count_interval(self.correct, self.passed) if self.passed else None

    def statement(self) -> str:
        """The sentence the report, the screen and FHIR carry."""
        if not self.passed:
            return (
                f"No cell of the {self.cells} randomly chosen reviewed cells passed the gates: no accuracy "
                "can be stated for cells counted without a person"
            )
        lo, hi = self.interval or (0.0, 1.0)
        said = (
            f"Cells counted without a person at this microscope: estimated {100 * (self.accuracy or 0):.0f}% right "
            f"(95% interval {100 * lo:.0f}–{100 * hi:.0f}%): {self.correct} right of the {self.passed} the gates "
            f"let through, among {self.cells} randomly chosen cells a person reviewed"
        )
        if not self.target_met:
            said += (
                f"; short of the {100 * (1 - self.target_error):.0f}% aimed for at every confidence, so the "
                "device's own confidence rule is kept: review more randomly chosen cells "
                "(bmc edge review --for-calibration) and adapt again"
            )
        return said

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["accuracy"] = self.accuracy
        d["interval"] = list(self.interval) if self.interval else None
        d["statement"] = self.statement()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabCalibration:
        # target_met came later: a card written before it has none (it met its target or kept the strictest rule)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "target_met"]
        return cls(**{n: d[n] for n in names}, target_met=bool(d.get("target_met", True)))


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal threshold: the ⌈(n+1)·level⌉-th smallest score (the largest when that
    rank is past the sample), so a new exchangeable score falls within it with probability ≥ level."""
    s = np.sort(np.asarray(scores, np.float64))
    rank = math.ceil((len(s) + 1) * level)
    return float(s[min(rank, len(s)) - 1])


def calibrate(
    probs: np.ndarray,
    truth: list[int | None],
    distances: np.ndarray | None,
    card_threshold: float | None,
    level: float = DEFAULT_LEVEL,
    target_error: float = 0.05,
    fallback_confidence: float = ReviewPolicy().min_confidence,
    apart: tuple[int, ...] = (),
    lowest: float = 0.0,
) -> LabCalibration:
    """The gates from a random sample of reviewed cells. ``probs``: each cell's class probabilities
    from a head not fitted on it; ``truth``: its class index, or None for a cell the reviewer
    rejected or named with a class the model does not know (wrong whenever it is counted);
    ``distances``: each cell's unknown-cell score against the reference without its own field
    (None: no unknown-cell check); ``apart``: the classes counted apart from the differential
    (platelets): a cell the model calls one of them enters no percentage, so the error rate and the
    statement are of the other cells, the ones a differential is made of; ``lowest``: no rule below
    this confidence is chosen."""
    n = len(truth)
    if n < MIN_CELLS:
        raise ValueError(f"{n} random reviewed cells are too few to calibrate the gates (need {MIN_CELLS})")
    known = np.array([t is not None for t in truth])
    threshold = card_threshold
    inside = np.ones(n, bool)
    lab_quantile = None
    if distances is not None and card_threshold is not None:
        d = np.asarray(distances, np.float64)
        # the laboratory's own conformal quantile is kept for the record, not used: raised to it, the
        # threshold let Munich blasts and artefacts through at BCCD (benchmarks/README.md, "Gates
        # calibrated at the laboratory"); the laboratory's reviewed cells join the reference instead
        lab_quantile = conformal_quantile(d[known], level) if known.sum() >= MIN_CELLS // 2 else None
        inside = d <= card_threshold
    top = probs.max(axis=1)
    right = np.array([t is not None and int(np.argmax(p)) == t for p, t in zip(probs, truth)])
    judged = ~np.isin(probs.argmax(axis=1), list(apart))
    # the lowest threshold at which the cells let through are wrong at most target_error of the
    # time, among thresholds that let at least MIN_PASSED cells through (a rate of a handful of
    # cells is noise). None: the device's own rule, its error stated. The strictest instead left
    # the device counting one cell in a hundred on its own (benchmarks/README.md, "Autonomy")
    candidates = inside & judged
    chosen, met = _lowest_confidence(top, right, candidates, target_error, fallback_confidence, lowest)
    # each cell judged by the threshold the other cells choose (see the module's docstring)
    passed = np.zeros(n, bool)
    for i in np.flatnonzero(candidates):
        others = candidates.copy()
        others[i] = False
        passed[i] = top[i] >= _lowest_confidence(top, right, others, target_error, fallback_confidence, lowest)[0]
    return LabCalibration(
        cells=n,
        level=level,
        unknown_threshold=threshold,
        lab_unknown_quantile=lab_quantile,
        min_confidence=float(chosen),
        target_error=target_error,
        passed=int(passed.sum()),
        correct=int(right[passed].sum()),
        counted_share=float((inside & (top >= chosen)).mean()),
        target_met=met,
    )


def _lowest_confidence(
    top: np.ndarray,
    right: np.ndarray,
    candidates: np.ndarray,
    target_error: float,
    fallback: float,
    lowest: float = 0.0,
) -> tuple[float, bool]:
    """The lowest confidence of :data:`CONFIDENCE_GRID` at which the ``candidates`` let through (at
    least MIN_PASSED) are wrong at most ``target_error`` of the time, and True; else ``fallback``
    and False."""
    for t in CONFIDENCE_GRID:
        if t < lowest:
            continue
        passed = candidates & (top >= t)
        if passed.sum() >= MIN_PASSED and (~right[passed]).mean() <= target_error:
            return t, True
    return fallback, False

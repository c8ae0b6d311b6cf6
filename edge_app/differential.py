"""The differential count: running counts and percentages per class, a target, derived ratios,
and the cells set aside for review instead of being counted silently.

A cell is flagged for review when its top probability is below ``min_confidence`` or the top two
are closer than ``min_margin``; flagged cells are stored and shown in the report but not counted
until a person confirms them (as a technician would set aside a cell they cannot name).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bmc.edge_app.unknown import DEFAULT_LEVEL
from bmc.edge_app.unknown import FLAG as UNKNOWN

# Lineages of the PBC / bone-marrow labels, for the myeloid:erythroid (M:E) ratio.
MYELOID = {
    "neutrophil",
    "ig",
    "eosinophil",
    "basophil",
    "monocyte",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band",
    "segmented",
    "pmy",
    "my",
    "mmy",
    "bne",
    "sne",
    "ngb",
    "ngs",
    "mmz",
    "myb",
    "pmo",
    "eos",
    "bas",
    "mon",
}
ERYTHROID = {"erythroblast", "erb", "ebo", "peb", "proerythroblast"}
# the order a differential is read in, for every view of it: neutrophils (segmented and bands with a
# stage model), lymphocytes, monocytes, eosinophils, basophils, then the immature granulocytes;
# nucleated red cells come after (beside a blood differential, inside a marrow one), platelets apart
CLINICAL_ORDER = [
    "neutrophil",
    "segmented",
    "band",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "ig",
    "metamyelocyte",
    "myelocyte",
    "promyelocyte",
    "erythroblast",
    "platelet",
]
SPECIMENS = ("blood", "marrow")
# what a class is called where a person reads it (a class not here is called by its label)
DISPLAY = {"ig": "immature granulocytes (ig)"}


def display(label: str) -> str:
    return DISPLAY.get(label, label)


#: what every view calls the erythroblasts of a blood count, reported per 100 leukocytes beside it
NRBC = "NRBC"
NOT_NUCLEATED = ("platelet",)  # counted and reported apart: never in a denominator


def count_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) confidence interval of a class's share when ``k`` of ``n`` counted
    cells belong to it — the binomial limits behind Rümke's table, which hematology uses to say how
    far a differential of ``n`` cells can be trusted (5 eosinophils in 100 cells: 1.6–11.3%)."""
    if not 0 <= k <= n or n == 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    tail = (1 - level) / 2
    i = np.arange(n + 1)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    log_choose = log_fact[n] - log_fact - log_fact[::-1]

    def cdf(upto: int, p: float) -> float:  # P(X <= upto), X ~ Binomial(n, p), in log space
        if p <= 0.0 or p >= 1.0:
            return 1.0 if p <= 0.0 or upto >= n else 0.0
        logs = log_choose[: upto + 1] + i[: upto + 1] * math.log(p) + (n - i[: upto + 1]) * math.log1p(-p)
        top = logs.max()
        return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))

    def solve(upto: int, target: float) -> float:  # the p where P(X <= upto) = target (it falls with p)
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(upto, mid) > target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(k - 1, 1 - tail)  # P(X >= k) = tail
    upper = 1.0 if k == n else solve(k, tail)  # P(X <= k) = tail
    return lower, upper


def clinical_order(labels: Iterable[str]) -> list[str]:
    """``labels`` in the order a differential is read (:data:`CLINICAL_ORDER`); a class no model of
    the kit names (one a laboratory added) after the known ones, alphabetically."""
    labels = list(dict.fromkeys(labels))
    return [l for l in CLINICAL_ORDER if l in labels] + sorted(l for l in labels if l not in CLINICAL_ORDER)


@dataclasses.dataclass(frozen=True)
class ClassShare:
    """One line of a differential: a class's count and its share of the denominator, with the
    exact 95% limits of that share (percent)."""

    label: str
    count: int
    percent: float
    low: float | None = None  # None: a rate per 100 leukocytes (NRBC), which has no binomial limits
    high: float | None = None

    def limits(self) -> str:
        return "" if self.low is None or self.high is None else f"{self.low:.1f}–{self.high:.1f}%"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "count": self.count,
            "percent": round(self.percent, 1),
            "low": None if self.low is None else round(self.low, 1),
            "high": None if self.high is None else round(self.high, 1),
        }


def _share(label: str, k: int, n: int) -> ClassShare:
    if not n:
        return ClassShare(label, k, 0.0, 0.0, 100.0)
    lo, hi = count_interval(min(k, n), n)
    return ClassShare(label, k, 100.0 * k / n, 100.0 * lo, 100.0 * hi)


@dataclasses.dataclass(frozen=True)
class DifferentialCount:
    """A session's differential as a laboratory writes it down, computed once
    (:func:`differential_of`) and rendered by every view — the console line, the live window, the
    screen, the Live page, ``report.html``, ``differential.csv`` and the FHIR export.

    A *blood* differential is per 100 leukocytes: erythroblasts (nucleated red cells) are reported
    per 100 leukocytes beside it, not in it. A *marrow* differential (myelogram) is per 100
    nucleated cells, erythroid precursors included, with the myeloid : erythroid ratio. Platelets
    are a count apart in both, and cells waiting for review are in no class."""

    specimen: str  # blood | marrow
    rows: tuple[ClassShare, ...]  # the differential, in clinical order, every class (zeros too)
    nrbc: ClassShare | None  # blood: erythroblasts per 100 leukocytes (their count may exceed it)
    platelets: int
    waiting: int  # set aside for review, not counted
    unknown: int  # of those, unlike any cell the model knows
    me_ratio: float | None  # marrow: myeloid : erythroid, None where no erythroid cell was counted

    @property
    def denominator(self) -> str:
        return "leukocytes" if self.specimen == "blood" else "nucleated cells"

    @property
    def total(self) -> int:
        """The cells the shares are of (the leukocytes of a blood count, the nucleated cells of a marrow)."""
        return sum(r.count for r in self.rows)

    @property
    def counted(self) -> int:
        """Every cell counted: the differential, the erythroblasts beside it and the platelets."""
        return self.total + (self.nrbc.count if self.nrbc else 0) + self.platelets

    def share(self, label: str) -> ClassShare | None:
        for r in self.rows:
            if r.label == label:
                return r
        return self.nrbc if self.nrbc is not None and self.nrbc.label == label else None

    def lines(self) -> list[str]:
        """The differential in words, a line per class counted (zero rows left out of the short
        forms: the console and the live window), then the erythroblasts and the platelets."""
        out = [f"{display(r.label)} {r.count} ({r.percent:.1f}%)" for r in self.rows if r.count]
        if self.nrbc is not None and self.nrbc.count:
            out.append(f"{NRBC} {self.nrbc.count} ({self.nrbc.percent:.1f}/100 WBC)")
        if self.platelets:
            out.append(f"platelets {self.platelets} (apart)")
        return out

    def rounding_note(self) -> str:
        """'' where the shares as shown (0.1%) add to 100%; else a sentence saying they are rounded
        (three shares of a third show 33.3% each: 99.9%)."""
        shown = round(sum(round(r.percent, 1) for r in self.rows), 1)
        if not self.total or shown == 100.0:
            return ""
        return f"The shares are rounded to 0.1%: as shown they add to {shown:.1f}%, exactly 100% before rounding."

    def ratios(self) -> list[str]:
        return [f"M:E {self.me_ratio:.2f}"] if self.me_ratio is not None else []

    def text(self, target: int | None = None) -> str:
        """The console's one line: the differential, then what waits for review."""
        tgt = f"/{target}" if target else ""
        unknown = f" ({self.unknown} unknown)" if self.unknown else ""
        noun = self.denominator if self.total != 1 or tgt else self.denominator[:-1]  # 1 leukocyte
        return (
            f"{self.total}{tgt} {noun}: "
            + (", ".join(self.lines()) or "none")
            + f"; {self.waiting} for review{unknown}"
            + "".join(f", {r}" for r in self.ratios())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "specimen": self.specimen,
            "denominator": self.denominator,
            "total": self.total,
            "rows": [r.to_dict() for r in self.rows],
            "nrbc": self.nrbc.to_dict() if self.nrbc else None,
            "platelets": self.platelets,
            "waiting": self.waiting,
            "unknown": self.unknown,
            "me_ratio": None if self.me_ratio is None else round(self.me_ratio, 2),
        }


def in_denominator(label: str, specimen: str) -> bool:
    """Whether a class's cells are in the differential's denominator: the leukocytes of a blood
    count (not the erythroblasts beside it), the nucleated cells of a marrow count; never platelets."""
    return label not in NOT_NUCLEATED and (specimen == "marrow" or label.lower() not in ERYTHROID)


def differential_of(
    counts: Mapping[str, int],
    labels: Iterable[str] = (),
    specimen: str = "blood",
    waiting: int = 0,
    unknown: int = 0,
) -> DifferentialCount:
    """The differential of ``counts`` (cells counted by final class), listing every class of
    ``labels`` (the model's) and of ``counts`` (a reviewer's new class too), in clinical order."""
    if specimen not in SPECIMENS:
        raise ValueError(f"specimen must be one of {', '.join(SPECIMENS)}, got {specimen!r}")
    counts = {l: int(k) for l, k in counts.items() if k}
    classes = clinical_order([*labels, *counts])
    erythroid = [l for l in classes if l.lower() in ERYTHROID]
    apart = [l for l in classes if l in NOT_NUCLEATED]
    in_count = [l for l in classes if in_denominator(l, specimen)]
    n = sum(counts.get(l, 0) for l in in_count)
    nrbc = None
    if specimen == "blood" and erythroid:  # per 100 leukocytes: a rate, not a share (no binomial limits)
        k = sum(counts.get(l, 0) for l in erythroid)
        nrbc = ClassShare(
            "erythroblast" if "erythroblast" in erythroid else erythroid[0], k, 100.0 * k / n if n else 0.0
        )
    me = None
    if specimen == "marrow":
        e = sum(counts.get(l, 0) for l in erythroid)
        m = sum(counts.get(l, 0) for l in in_count if l.lower() in MYELOID)
        me = m / e if e else None
    return DifferentialCount(
        specimen=specimen,
        rows=tuple(_share(l, counts.get(l, 0), n) for l in in_count),
        nrbc=nrbc,
        platelets=sum(counts.get(l, 0) for l in apart),
        waiting=waiting,
        unknown=unknown,
        me_ratio=me,
    )


@dataclasses.dataclass(frozen=True)
class ReviewPolicy:
    min_confidence: float = 0.6
    min_margin: float = 0.15
    # a cell whose embedding lies beyond the distance that this share of the training laboratory's
    # validation cells keep is set aside as unknown (edge_app/unknown.py); 0 turns the check off
    unknown_level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if self.unknown_level and not 0.9 <= self.unknown_level <= 0.999:
            raise ValueError(f"unknown_level must be 0 (off) or between 0.9 and 0.999, got {self.unknown_level}")

    def flag(self, probs: np.ndarray) -> str:
        """'' for a confident call, else why the cell needs review."""
        top2 = np.sort(probs)[-2:]
        if top2[-1] < self.min_confidence:
            return f"low confidence {top2[-1]:.2f}"
        if len(top2) > 1 and top2[-1] - top2[-2] < self.min_margin:
            return f"top two within {top2[-1] - top2[-2]:.2f}"
        return ""


class Differential:
    """The running count of a session as it records: the model's sure calls by class, and the cells
    set aside. :meth:`record` is its :class:`DifferentialCount`, which every view renders."""

    def __init__(
        self,
        labels: Iterable[str],
        target: int | None = None,
        review: ReviewPolicy = ReviewPolicy(),
        specimen: str = "blood",
    ):
        self.labels = list(labels)
        self.target = target
        self.review = review
        self.specimen = specimen
        self.counts = {l: 0 for l in self.labels}
        self.flagged = 0
        self.unknown = 0  # of the flagged: unlike any cell the model knows
        # the session's thread counts while the screen reads: each change and each read is whole
        self._lock = threading.Lock()

    def add(self, probs: np.ndarray, unknown: str = "") -> tuple[str, float, str]:
        """Count one cell; returns (label, confidence, review flag). ``unknown``: the unknown-cell
        check's flag for it (edge_app/unknown.py), which sets it aside before any other rule."""
        i = int(np.argmax(probs))
        label, conf = self.labels[i], float(probs[i])
        flag = unknown or self.review.flag(probs)
        self.restore(label, flag)
        return label, conf, flag

    def restore(self, label: str, flag: str) -> None:
        """Count a cell recorded earlier in the session (a resumed session) as it was counted then."""
        with self._lock:
            if flag:
                self.flagged += 1
                self.unknown += flag.startswith(UNKNOWN)
            elif label in self.counts:
                self.counts[label] += 1

    def tally(self) -> tuple[dict[str, int], int, int]:
        """The running count as it stands (one moment's: counts, set aside, of them unknown), to
        go :meth:`back_to` or to show."""
        with self._lock:
            return dict(self.counts), self.flagged, self.unknown

    def back_to(self, tally: tuple[dict[str, int], int, int]) -> None:
        """The count as it stood at ``tally``: cells that were counted but never recorded (their
        frame's commit failed) leave it."""
        with self._lock:
            counts, self.flagged, self.unknown = tally
            self.counts = dict(counts)

    def record(self, tally: tuple[dict[str, int], int, int] | None = None) -> DifferentialCount:
        """The differential now, or as it stood at ``tally``."""
        counts, flagged, unknown = tally or self.tally()
        return differential_of(counts, self.labels, self.specimen, flagged, unknown)

    @property
    def counted(self) -> int:
        """The cells the target is of: the differential's denominator (leukocytes, or nucleated
        cells of a marrow), not the platelets or the erythroblasts beside a blood count. Read every
        frame: summed here, without the record's interval computations."""
        return self.counted_in(self.tally()[0])

    def counted_in(self, counts: dict[str, int]) -> int:
        return sum(k for l, k in counts.items() if in_denominator(l, self.specimen))

    @property
    def done(self) -> bool:
        return self.target is not None and self.target > 0 and self.counted >= self.target

    def summary(self) -> str:
        return self.record().text(self.target)

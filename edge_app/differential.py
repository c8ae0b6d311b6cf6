"""The differential count: running counts and percentages per class, a target, derived ratios,
and the cells set aside for review instead of being counted silently.

A cell is flagged for review when its top probability is below ``min_confidence`` or the top two
are closer than ``min_margin``; flagged cells are stored and shown in the report but not counted
until a person confirms them (as a technician would set aside a cell they cannot name).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

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
# the order a differential is read in (neutrophils and bands first), for the screen and the FHIR export
CLINICAL_ORDER = [
    "segmented",
    "band",
    "neutrophil",
    "metamyelocyte",
    "myelocyte",
    "promyelocyte",
    "ig",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "erythroblast",
    "platelet",
]


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


@dataclasses.dataclass(frozen=True)
class ReviewPolicy:
    min_confidence: float = 0.6
    min_margin: float = 0.15
    # a cell whose embedding lies beyond the distance that this share of the training laboratory's
    # validation cells keep is set aside as unknown (edge_app/unknown.py); 0 turns the check off
    unknown_level: float = 0.98

    def __post_init__(self):
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
    def __init__(self, labels, target: int | None = None, review: ReviewPolicy = ReviewPolicy()):
        self.labels = list(labels)
        self.target = target
        self.review = review
        self.counts = {l: 0 for l in self.labels}
        self.flagged = 0
        self.unknown = 0  # of the flagged: unlike any cell the model knows

    def add(self, probs: np.ndarray, unknown: str = "") -> tuple[str, float, str]:
        """Count one cell; returns (label, confidence, review flag). ``unknown``: the unknown-cell
        check's flag for it (edge_app/unknown.py), which sets it aside before any other rule."""
        i = int(np.argmax(probs))
        label, conf = self.labels[i], float(probs[i])
        flag = unknown or self.review.flag(probs)
        if flag:
            self.flagged += 1
            self.unknown += flag.startswith(UNKNOWN)
        else:
            self.counts[label] += 1
        return label, conf, flag

    def restore(self, label: str, flag: str) -> None:
        """Count a cell recorded earlier in the session (a resumed session) as it was counted then."""
        if flag:
            self.flagged += 1
            self.unknown += flag.startswith(UNKNOWN)
        elif label in self.counts:
            self.counts[label] += 1

    @property
    def counted(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> bool:
        return bool(self.target) and self.counted >= self.target

    def percentages(self) -> dict[str, float]:
        n = self.counted
        return {l: (100.0 * c / n if n else 0.0) for l, c in self.counts.items()}

    def ratios(self) -> dict[str, float | None]:
        lower = {l.lower(): c for l, c in self.counts.items()}
        out: dict[str, float | None] = {}
        m = sum(c for l, c in lower.items() if l in MYELOID)
        e = sum(c for l, c in lower.items() if l in ERYTHROID)
        if any(l in ERYTHROID for l in lower) and any(l in MYELOID for l in lower):
            out["M:E"] = (m / e) if e else None
        return out

    def breakdown(self) -> tuple[list[str], list[str]]:
        """(each class counted so far with its share, each defined ratio): the text of the summary
        line and of the live window's panel."""
        pct = self.percentages()
        parts = [f"{l} {self.counts[l]} ({pct[l]:.0f}%)" for l in self.labels if self.counts[l]]
        return parts, [f"{k} {v:.2f}" for k, v in self.ratios().items() if v is not None]

    def summary(self) -> str:
        parts, ratios = self.breakdown()
        tgt = f"/{self.target}" if self.target else ""
        ratio = "".join(f", {r}" for r in ratios)
        unknown = f" ({self.unknown} unknown)" if self.unknown else ""
        return (
            f"{self.counted}{tgt} cells: "
            + (", ".join(parts) or "none")
            + f"; {self.flagged} for review{unknown}{ratio}"
        )

"""Maturation stages and their hierarchy: the marrow-minded differential.

The Barcelona PBC release names each image's maturation stage in its file-name prefix
(``PMY_1234.jpg``). A *stage model* learns the 11 labels of :data:`STAGE_LABELS`; each stage
names its 8-class parent (:data:`PARENT`), so the same model answers at both levels: the
8-class differential that the shipped model counts, and the granulocytic series
promyelocyte → myelocyte → metamyelocyte → band → segmented that a marrow differential is about.

The hierarchy travels with the model in its contract (``Contract.parents``). Pure Python and
numpy: the device imports it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: PBC file-name prefix → stage label. ``IG`` and ``NEUTROPHIL`` (unspecified stage) are not here:
#: a stage model leaves those 117 images out.
PBC_PREFIX = {
    "BA": "basophil",
    "EO": "eosinophil",
    "ERB": "erythroblast",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "PLATELET": "platelet",
    "PMY": "promyelocyte",
    "MY": "myelocyte",
    "MMY": "metamyelocyte",
    "BNE": "band",
    "SNE": "segmented",
}
UNSPECIFIED_PREFIXES = ("IG", "NEUTROPHIL")

#: The granulocytic (neutrophil) series, youngest first: neighbours are one stage apart.
GRANULOCYTIC_SERIES = ("promyelocyte", "myelocyte", "metamyelocyte", "band", "segmented")

#: Each stage's 8-class parent (classes that have no stages are their own parent).
PARENT = {
    "promyelocyte": "ig",
    "myelocyte": "ig",
    "metamyelocyte": "ig",
    "band": "neutrophil",
    "segmented": "neutrophil",
}

STAGE_LABELS = ("basophil", "eosinophil", "erythroblast", "lymphocyte", "monocyte", "platelet", *GRANULOCYTIC_SERIES)


def stage_of_prefix(stem: str) -> str | None:
    """The stage label of a PBC file stem (``PMY_1234`` → ``promyelocyte``); None for an
    unspecified stage (``IG_…``, ``NEUTROPHIL_…``) or an unknown prefix."""
    return PBC_PREFIX.get(stem.split("_")[0])


def parents_for(labels: Sequence[str]) -> dict[str, str] | None:
    """The contract's ``parents`` for a label set: the stage → parent map restricted to ``labels``,
    or None when no label is a stage (an 8-class model)."""
    found = {label: PARENT[label] for label in labels if label in PARENT}
    return found or None


def coarse_labels(labels: Sequence[str], parents: Mapping[str, str] | None) -> tuple[str, ...]:
    """The parent level's labels, in sorted order (the 8-class model's order)."""
    parents = parents or {}
    return tuple(sorted({parents.get(label, label) for label in labels}))


def coarse_probs(
    probs: np.ndarray, labels: Sequence[str], parents: Mapping[str, str] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Sum the stage probabilities into their parents: ``(probs over coarse labels, coarse labels)``."""
    coarse = coarse_labels(labels, parents)
    index = {c: i for i, c in enumerate(coarse)}
    parents = parents or {}
    m = np.zeros((len(labels), len(coarse)), np.float32)
    for i, label in enumerate(labels):
        m[i, index[parents.get(label, label)]] = 1.0
    return np.asarray(probs, np.float32) @ m, coarse


def coarse_counts(counts: Mapping[str, int], parents: Mapping[str, str] | None) -> dict[str, int]:
    """Counts by stage summed into their parents (the 8-class differential of a stage model)."""
    parents = parents or {}
    out: dict[str, int] = {}
    for label, n in counts.items():
        out[parents.get(label, label)] = out.get(parents.get(label, label), 0) + n
    return out


def series_counts(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """The granulocytic series, youngest first, with each stage's count."""
    return [(stage, int(counts.get(stage, 0))) for stage in GRANULOCYTIC_SERIES]


def series_position(label: str) -> int | None:
    """Where a label sits in the granulocytic series (0 = promyelocyte), or None."""
    return GRANULOCYTIC_SERIES.index(label) if label in GRANULOCYTIC_SERIES else None


def stage_distance(a: str, b: str) -> int | None:
    """How many stages apart two series labels are (0 = same); None when either is not a stage."""
    pa, pb = series_position(a), series_position(b)
    return None if pa is None or pb is None else abs(pa - pb)


def soft_targets(labels: Sequence[str], smoothing: float, neighbour: float) -> np.ndarray:
    """Training targets, one row per true class: ``1 - smoothing - neighbour`` on the class,
    ``neighbour`` shared by its adjacent stages in the granulocytic series (a cell called one
    stage off is not punished like a distant error: maturation is a continuum and experts
    disagree between neighbours), and ``smoothing`` spread evenly over every class.

    A class with no neighbours in ``labels`` keeps the neighbour share itself.
    """
    n = len(labels)
    if smoothing < 0 or neighbour < 0 or smoothing + neighbour >= 1:
        raise ValueError(f"smoothing ({smoothing}) and neighbour ({neighbour}) must be >= 0 and add up to < 1")
    t = np.full((n, n), smoothing / n, np.float32)
    for i, label in enumerate(labels):
        near = [j for j, other in enumerate(labels) if stage_distance(label, other) == 1]
        t[i, i] += 1.0 - smoothing - (neighbour if near else 0.0)
        for j in near:
            t[i, j] += neighbour / len(near)
    return t

"""Finding nucleated cells in a stained field (May-Grünwald-Giemsa / Wright).

Nuclei take up the basic dye and are blue-purple, while red cells are pink and the background
pale: in CIELAB the nuclear stain stands out on the yellow-blue axis (*b*), relative to the
field's own median, so the rule holds across stains, white balance and exposure. The pipeline:

1. *b* below the field median by ``b_drop`` (and darker than the background, the field's brightest
   tenth, by ``l_drop``) → stain mask; of
   those pixels, the ones whose colour (*a*, *b*) lies within ``red_cell_chroma`` of the field's
   red cells are red cells, whatever the stain tinted them — an alkaline Giemsa turns them lilac or
   bluish-grey, below the field's *b* median, and the nuclear stain is still further away. The red
   cells' colour (the median of what is not background: red cells outnumber every other cell) is
   measured on each field, so the rule follows the stain from smear to smear and from the thin
   end of a smear to the thick; a field with too few cells to tell takes the session's colour
   (:class:`RedCells`, measured with the red cells' size);
2. opening removes specks, closing joins the lobes of segmented neutrophils;
3. connected components, each a candidate nucleus group; platelets and debris are dropped by area,
   elongated artefacts by solidity;
4. components too large for one cell are split by watershed on the distance transform (touching
   white cells);
5. each cell's box is its nucleus group's box grown by ``cell_margin`` to take in the cytoplasm.

Sizes are in pixels of the frame, with defaults for the fields they were tuned on (BCCD: a 640x480
camera at high magnification, red cells about 90 px across). They follow the magnification:
:class:`RedCells` measures the red cells (7-8 µm across in every smear) on the session's first
frames, then now and then, and :func:`scaled` resizes every threshold by the ratio of the red
cells' diameter to ``reference_red_cell_px`` — a 256 px high-magnification field, a 640x480
camera and a 1080p one alike. ``[finder] follow_scale = false`` keeps the sizes as written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from bmc.edge_app.cells import Box


@dataclasses.dataclass(frozen=True)
class FinderConfig:
    b_drop: float = 14.0  # LAB b (0..255 scale) below the field median
    l_drop: float = 8.0  # LAB L below the background (the field's brightest tenth)
    open_px: int = 3
    close_px: int = 15  # joins nuclear lobes up to this far apart
    min_area_px: int = 2000  # a nucleus group (~50 px across); platelets and their clumps are smaller
    max_area_px: int = 60000
    split_area_px: int = 14000  # larger than one cell: try watershed
    # watershed seeds closer than this are one cell's (lobes, a stained cytoplasm): about a small
    # lymphocyte's diameter, the least distance between two touching cells' centres
    seed_min_sep_px: float = 81.0
    # ... and are parted by a waist narrower than this share of the smaller seed's radius
    neck_ratio: float = 0.7
    seed_min_radius_px: float = 22.0  # a seed is at least this deep inside the shape (a small nucleus's radius)
    # pieces of stain at most this far apart (bounding boxes) whose union spans at most
    # lobe_span_px are one cell's lobes (0: off)
    lobe_gap_px: float = 36.0
    lobe_span_px: float = 160.0
    min_solidity: float = 0.35
    red_cell_chroma: float = (
        16.0  # LAB a*b* distance from the field's red cells below which a pixel is a red cell (0: off)
    )
    cell_margin: float = 1.25  # box side = nucleus group side x margin
    max_cells: int = 200
    # the red cells' diameter (by red_cell_diameter) in the fields these sizes are for; the sizes
    # follow the session's measured red cells when follow_scale is on
    reference_red_cell_px: float = 90.0
    follow_scale: bool = True
    # this microscope's red-cell diameter in frame pixels, measured once (a long session's report
    # gives it): every session then cuts at that scale from its first field on (0: measured in each)
    red_cell_px: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"finder.{f.name} must be >= 0, got {v}")
        if self.min_area_px >= self.max_area_px:
            raise ValueError("finder.min_area_px must be smaller than finder.max_area_px")


@dataclasses.dataclass(frozen=True)
class FoundCell:
    box: Box
    nucleus_area: int
    centre: tuple[float, float]
    nucleus: Box | None = None  # the stained nucleus group's own bounding box


def median_u8(channel: np.ndarray) -> float:
    """``np.median`` of a uint8 array, exactly, from its histogram (several times faster)."""
    cum = np.cumsum(np.bincount(channel.ravel(), minlength=256))
    n = int(cum[-1])
    lo = int(np.searchsorted(cum, (n - 1) // 2 + 1))  # the two middle order statistics
    hi = int(np.searchsorted(cum, n // 2 + 1))
    return (lo + hi) / 2


def _cells_of(lab: np.ndarray, share: float = 1.0) -> np.ndarray | None:
    """The pixels of a (small, float) LAB field that are not background, by their colour distance to
    the brightest tenth of the field (beyond ``share`` of Otsu's threshold), or None for a blank
    field."""
    light = lab[..., 0] >= np.percentile(lab[..., 0], 90)
    distance = np.sqrt(((lab - np.median(lab[light], axis=0)) ** 2).sum(-1))
    d8: np.ndarray = np.clip(distance * 2, 0, 255).astype(np.uint8)
    if int(d8.max()) - int(d8.min()) < 16:
        return None
    t, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (d8 > share * t).astype(np.uint8) * 255


def red_cell_colour(lab: np.ndarray) -> tuple[float, float] | None:
    """The red cells' (a*, b*) in a field: the median colour of what is not background (on a copy
    about 80 pixels high), or None for a field with too few cells to tell."""
    k = min(1.0, 80 / min(lab.shape[:2]))
    small = cv2.resize(lab, None, fx=k, fy=k, interpolation=cv2.INTER_AREA).astype(np.float32)
    fg = _cells_of(small, 0.5)  # half Otsu's line: in a sparse field it can part the nuclei from everything pale
    if fg is None or cv2.countNonZero(fg) < 50:
        return None
    cells = small[fg > 0]
    return float(np.median(cells[:, 1])), float(np.median(cells[:, 2]))


def stain_mask(bgr: np.ndarray, cfg: FinderConfig, session_red: tuple[float, float] | None = None) -> np.ndarray:
    """The nuclear-stain pixels of a field (255). The red cells' colour is measured on the field;
    ``session_red`` (:attr:`RedCells.red_colour`) stands in where the field has too few cells."""
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)
    # darker than the background (the field's brightest tenth), not than its median: in a dense
    # field the median is a red cell's, and a pale nucleus is lighter than that
    background = float(np.percentile(lab[::4, ::4, 0], 90))
    mask: np.ndarray = (lab[..., 2] < median_u8(lab[..., 2]) - cfg.b_drop) & (lab[..., 0] < background - cfg.l_drop)
    red = None
    if cfg.red_cell_chroma:
        red = red_cell_colour(lab) or session_red
    if red is not None:  # stained like the red cells: a tinted red cell, not a nucleus
        levels = np.arange(256, dtype=np.float32)
        near = np.add.outer((levels - red[0]) ** 2, (levels - red[1]) ** 2) <= cfg.red_cell_chroma**2  # [a, b]
        ys, xs = np.nonzero(mask)
        drop = near[lab[ys, xs, 1], lab[ys, xs, 2]]
        mask[ys[drop], xs[drop]] = False
    mask = mask.astype(np.uint8) * 255
    if cfg.open_px:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.open_px,) * 2))
    if cfg.close_px:
        mask = cv2.morphologyEx(
            mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.close_px,) * 2)
        )
    return mask


RED_CELL_UM = 7.5  # a normal red cell's diameter, in micrometres


def red_cell_diameter(bgr: np.ndarray, side: int = 160) -> float | None:
    """The typical red-cell diameter in a field, in its pixels, or None for a field without them.

    Everything that is not background (by its colour distance to the brightest tenth of the field)
    is a cell; pale centres and small gaps are filled; the size at which morphological openings
    with growing discs remove the most area is the typical cell's radius (a granulometry: it holds
    for touching cells, where outlines cannot be traced one by one). Red cells outnumber every
    other cell in a smear, so that size is theirs. Measured on a copy ``side`` pixels high."""
    h, w = bgr.shape[:2]
    s = side / min(h, w)
    img = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else bgr
    s = min(s, 1.0)
    fg = _cells_of(cv2.cvtColor(cv2.GaussianBlur(img, (5, 5), 0), cv2.COLOR_BGR2LAB).astype(np.float32))
    if fg is None:  # a blank field
        return None
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    n, holes, stats, _ = cv2.connectedComponentsWithStats(255 - fg, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < 0.01 * fg.size
    small[0] = False
    fg[small[holes]] = 255  # pale centres and gaps inside cells
    if cv2.countNonZero(fg) < 0.02 * fg.size:
        return None
    radii = np.arange(1, max(4, min(fg.shape) // 6))
    areas = np.array(
        [
            cv2.countNonZero(
                cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
            )
            for r in radii
        ],
        float,
    )
    lost = -np.diff(areas)
    if lost.max() <= 0:
        return None
    k = int(np.argmax(lost))
    peak = float(k)
    if 0 < k < len(lost) - 1:  # the peak between the radii tried: a parabola through it and its neighbours
        a, b, c = lost[k - 1], lost[k], lost[k + 1]
        if a - 2 * b + c < 0:
            peak = k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(2 * (radii[0] + peak + 0.5) / s)


def scaled(cfg: FinderConfig, red_cell_px: float | None) -> FinderConfig:
    """``cfg`` with every size resized from ``reference_red_cell_px`` to the measured red cells."""
    if not cfg.follow_scale or not red_cell_px:
        return cfg
    k = red_cell_px / cfg.reference_red_cell_px
    return dataclasses.replace(
        cfg,
        open_px=max(1, int(round(cfg.open_px * k))),
        close_px=max(3, int(round(cfg.close_px * k))),
        min_area_px=max(20, int(cfg.min_area_px * k * k)),
        max_area_px=max(400, int(cfg.max_area_px * k * k)),
        split_area_px=max(100, int(cfg.split_area_px * k * k)),
        seed_min_sep_px=cfg.seed_min_sep_px * k,
        seed_min_radius_px=cfg.seed_min_radius_px * k,
        lobe_gap_px=cfg.lobe_gap_px * k,
        lobe_span_px=cfg.lobe_span_px * k,
    )


class RedCells:
    """The session's red cells: their diameter in frame pixels and their colour, measured on the
    first ``first`` frames, then every ``every``-th (the median of all measures), so a changed
    objective or stain is followed and the cost stays off most frames. ``fixed`` (pixels)
    overrides the diameter."""

    def __init__(self, fixed: float | None = None, first: int = 5, every: int = 50):
        self.fixed, self.first, self.every = fixed, first, every
        self.measures: list[float] = []
        self.colours: list[tuple[float, float]] = []
        self.red_colour: tuple[float, float] | None = None  # the red cells' LAB (a*, b*), for the finder
        self.frames = 0
        self.seeded = 0  # the first frames, measured ahead by seed()
        self.last: dict[str, Any] = {}  # what the latest observe measured

    def seed(self, images: Sequence[np.ndarray]) -> bool:
        """Measure the first ``first`` frames before any is searched (a source whose frames are
        there to be read ahead: files, a video). A session's first field then is cut at the scale of
        its first five, not at its own alone: one field's measure is off by up to a third (BCCD), and
        a red-cell scale too small parts a neutrophil's lobes into cells of their own. Those frames
        are not measured again when they come. True where a diameter was measured."""
        if self.frames or self.seeded:
            return self.diameter is not None
        for bgr in images[: self.first]:
            self._take(
                red_cell_colour(cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)), None if self.fixed else red_cell_diameter(bgr)
            )
            self.seeded += 1
        return self.diameter is not None

    def observe(self, bgr: np.ndarray) -> bool:
        """Measure this frame when it is due; True when the diameter may have changed. What it
        measured is in :attr:`last` (for :meth:`replay` in a resumed session)."""
        self.frames += 1
        self.last = {}
        if self.frames <= self.seeded:  # measured ahead, with the first frames (seed())
            return False
        if not (self.frames <= self.first or self.frames % self.every == 0):
            return False
        colour = red_cell_colour(cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB))
        d = None if self.fixed else red_cell_diameter(bgr)
        self.last = {"red_ab": list(colour) if colour else None, "red_px": d}
        self._take(colour, d)
        return d is not None

    def _take(self, colour: Sequence[float] | None, d: float | None) -> None:
        if colour is not None:
            self.colours.append((float(colour[0]), float(colour[1])))
            a, b = np.median(np.asarray(self.colours), axis=0)
            self.red_colour = (float(a), float(b))
        if d is not None:
            self.measures.append(float(d))

    def replay(self, measured: dict[str, Any] | None) -> None:
        """One frame of an interrupted session as it was observed: ``measured`` is what
        :meth:`observe` left in :attr:`last` then (empty on a frame not due)."""
        self.frames += 1
        if measured:
            self._take(measured.get("red_ab"), measured.get("red_px"))

    @property
    def diameter(self) -> float | None:
        return self.fixed or (float(np.median(self.measures)) if self.measures else None)

    @property
    def um_per_px(self) -> float | None:
        return RED_CELL_UM / self.diameter if self.diameter else None

    def to_dict(self) -> dict[str, Any]:
        d = self.diameter
        c = self.red_colour
        return {
            "red_cell_px": round(d, 1) if d else None,
            "um_per_px": round(RED_CELL_UM / d, 4) if d else None,
            "measured_frames": len(self.measures),
            "fixed": bool(self.fixed),
            "red_cell_um": RED_CELL_UM,
            "red_cell_lab_ab": [round(c[0], 1), round(c[1], 1)] if c else None,
        }


def _split_touching(component: np.ndarray, cfg: FinderConfig) -> list[np.ndarray]:
    """Watershed on the distance transform; returns one mask per cell (or the input).

    A seed is a local maximum of the distance transform of the shape (its holes filled), at least
    ``seed_min_radius_px`` deep. Taken deepest first, a seed is another cell's only when it lies at
    least ``seed_min_sep_px`` from every seed kept and a waist parts them (the shape narrows
    between them to under ``neck_ratio`` of the smaller one's radius): two round cells touching
    narrow to a waist, while the lobes of a segmented neutrophil, or an eosinophil whose granular
    cytoplasm took the stain, lie within one cell's body. Other seeds flood from the kept ones."""
    # the pale granules and vacuoles of a stained cytoplasm are holes in the mask, not waists: the
    # shape's distances are measured with its holes filled
    padded = cv2.copyMakeBorder(component, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(padded, None, (0, 0), 255)  # everything outside the shape
    filled = component | (255 - padded[1:-1, 1:-1])
    dist = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
    peak = dist.max()
    if peak <= 0:
        return [component]
    # candidate centres: the distance transform's local maxima deep enough to be a cell's middle
    # (a global threshold would lose a small cell beside a large one)
    k = max(3, int(cfg.seed_min_sep_px / 4) | 1)
    local = (dist >= cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))) & (
        dist >= max(cfg.seed_min_radius_px, 0.3 * peak)
    )
    ys, xs = np.nonzero(local)
    if len(xs) <= 1:
        return [component]
    strength = sorted(zip(dist[ys, xs].tolist(), xs.tolist(), ys.tolist()), reverse=True)
    kept: list[tuple[float, float, float]] = []  # x, y and radius (distance-transform peak) of each seed kept
    seeded = np.zeros(component.shape, np.int32)  # 0: to flood; 1: outside the component; 2..: a kept seed
    seeded[component == 0] = 1

    def neck(a: tuple[float, float], b: tuple[float, float]) -> float:
        """The narrowest half-width of the shape along the straight line between two seeds."""
        t = np.linspace(0.0, 1.0, 32)
        xs = np.clip(np.round(a[0] + t * (b[0] - a[0])).astype(int), 0, dist.shape[1] - 1)
        ys = np.clip(np.round(a[1] + t * (b[1] - a[1])).astype(int), 0, dist.shape[0] - 1)
        return float(dist[ys, xs].min())

    for radius, sx, sy in strength:
        c = (float(sx), float(sy))
        # another cell: far enough from every kept seed, and parted from it by a neck (two round
        # cells touching narrow to a waist; the lobes inside one stained cell do not)
        if all(
            (c[0] - x) ** 2 + (c[1] - y) ** 2 >= cfg.seed_min_sep_px**2
            and neck(c, (x, y)) < cfg.neck_ratio * min(radius, r)
            for x, y, r in kept
        ):
            kept.append((*c, radius))
    if len(kept) <= 1:
        return [component]
    for i, (x, y, r) in enumerate(kept):  # each seed a disc of half its radius
        cv2.circle(seeded, (int(x), int(y)), max(1, int(r / 2)), i + 2, -1)
    seeded[component == 0] = 1
    # flood along the distance transform's relief: the parts meet where the shape narrows
    relief = cv2.cvtColor((255 - 255 * dist / peak).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    ws = cv2.watershed(relief, seeded)
    return [((ws == k) * 255).astype(np.uint8) for k in range(2, len(kept) + 2) if (ws == k).any()]


def _group_lobes(pieces: list[tuple[int, int, int, int, int]], cfg: FinderConfig) -> list[list[int]]:
    """Pieces of stain (x, y, w, h, area) that make one cell: the lobes of one nucleus, parted by
    pale cytoplasm, lie close together and within one nucleus's span, while two neighbouring
    cells' nuclei together span more than a cell. Single-linkage over the pairs whose gap is at
    most ``lobe_gap_px`` and whose union spans at most ``lobe_span_px``; a group is kept only
    while its union still spans at most that."""
    groups = [[i] for i in range(len(pieces))]

    def span(members: list[int]) -> tuple[int, int, int, int]:
        x0 = min(pieces[i][0] for i in members)
        y0 = min(pieces[i][1] for i in members)
        x1 = max(pieces[i][0] + pieces[i][2] for i in members)
        y1 = max(pieces[i][1] + pieces[i][3] for i in members)
        return x0, y0, x1, y1

    merged = True
    while merged and len(groups) > 1:
        merged = False
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ax0, ay0, ax1, ay1 = span(groups[a])
                bx0, by0, bx1, by1 = span(groups[b])
                gap = max(0, max(ax0, bx0) - min(ax1, bx1), max(ay0, by0) - min(ay1, by1))
                x0, y0, x1, y1 = span(groups[a] + groups[b])
                extent = max(x1 - x0, y1 - y0)
                # mostly inside the other's box: a part of the same cell, whatever the cell's size
                ix = max(0, min(ax1, bx1) - max(ax0, bx0))
                iy = max(0, min(ay1, by1) - max(ay0, by0))
                nested = ix * iy >= 0.5 * min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
                lobes = gap <= cfg.lobe_gap_px and extent <= cfg.lobe_span_px
                if (nested or lobes) and (best is None or extent < best[0]):
                    best = (extent, a, b)
        if best is not None:
            _, a, b = best
            groups[a] = groups[a] + groups[b]
            del groups[b]
            merged = True
    return groups


def find_cells(
    bgr: np.ndarray, cfg: FinderConfig = FinderConfig(), red_colour: tuple[float, float] | None = None
) -> list[FoundCell]:
    """Nucleated cells in a BGR field, largest first. ``red_colour``: the session's red cells'
    (a*, b*) (:attr:`RedCells.red_colour`), for a field with too few cells to measure its own."""
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"find_cells expects an HxWx3 BGR frame, got shape {bgr.shape}")
    h, w = bgr.shape[:2]
    mask = stain_mask(bgr, cfg, red_colour)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    pieces: list[tuple[int, int, int, int, int]] = []  # each nucleus (or lobe) kept: x, y, w, h, area
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < cfg.min_area_px or area > cfg.max_area_px:
            continue
        comp = (labels[y : y + bh, x : x + bw] == i).astype(np.uint8) * 255
        parts = _split_touching(comp, cfg) if area > cfg.split_area_px else [comp]
        for part in parts:
            pts = cv2.findNonZero(part)
            if pts is None:
                continue
            a = int(cv2.countNonZero(part))
            if a < cfg.min_area_px:
                continue
            hull = cv2.convexHull(pts)
            if a / max(cv2.contourArea(hull), 1.0) < cfg.min_solidity:
                continue
            px, py, pw, ph = cv2.boundingRect(pts)
            pieces.append((int(x + px), int(y + py), int(pw), int(ph), a))
    cells: list[FoundCell] = []
    for group in _group_lobes(pieces, cfg) if cfg.lobe_span_px else [[i] for i in range(len(pieces))]:
        nx0 = min(pieces[i][0] for i in group)
        ny0 = min(pieces[i][1] for i in group)
        nx1 = max(pieces[i][0] + pieces[i][2] for i in group)
        ny1 = max(pieces[i][1] + pieces[i][3] for i in group)
        a = sum(pieces[i][4] for i in group)
        cx, cy = (nx0 + nx1) / 2, (ny0 + ny1) / 2
        side = max(nx1 - nx0, ny1 - ny0) * cfg.cell_margin
        bx, by = int(round(cx - side / 2)), int(round(cy - side / 2))
        x0, y0 = max(0, bx), max(0, by)
        x1, y1 = min(w, bx + int(round(side))), min(h, by + int(round(side)))
        cells.append(FoundCell(Box(x0, y0, x1 - x0, y1 - y0), a, (cx, cy), Box(nx0, ny0, nx1 - nx0, ny1 - ny0)))
    cells.sort(key=lambda c: -c.nucleus_area)
    return cells[: cfg.max_cells]

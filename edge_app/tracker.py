"""Counting each cell once while the field stands still.

A live camera or a video shows the same field for many frames. A cell whose centre lies within
``match_fraction`` of its diameter from a cell of the previous frames keeps that cell's track and
is not counted again; a cell with no such neighbour starts a new track and is counted. Tracks not
seen for ``max_missing`` frames end, so a moved field brings new cells. Still images (each file
its own field) are never matched across files.
"""

from __future__ import annotations

import dataclasses

from bmc.edge_app.cells import Box


@dataclasses.dataclass
class _Track:
    id: int
    centre: tuple[float, float]
    diameter: float
    last_seen: int


class CellTracker:
    def __init__(self, match_fraction: float = 0.5, max_missing: int = 5):
        self.match_fraction = match_fraction
        self.max_missing = max_missing
        self.tracks: list[_Track] = []
        self._next = 1

    def reset(self) -> None:
        self.tracks.clear()

    def update(self, frame_index: int, boxes: list[Box]) -> list[tuple[int, bool]]:
        """For each box: (track id, is_new). Greedy nearest-centre matching, one box per track."""
        self.tracks = [t for t in self.tracks if frame_index - t.last_seen <= self.max_missing]
        pairs = []
        for bi, b in enumerate(boxes):
            cx, cy = b.centre
            for ti, t in enumerate(self.tracks):
                d = ((cx - t.centre[0]) ** 2 + (cy - t.centre[1]) ** 2) ** 0.5
                if d <= self.match_fraction * max(b.diameter, t.diameter):
                    pairs.append((d, bi, ti))
        pairs.sort()
        out: list[tuple[int, bool] | None] = [None] * len(boxes)
        used_t: set[int] = set()
        for _, bi, ti in pairs:
            if out[bi] is None and ti not in used_t:
                t = self.tracks[ti]
                t.centre, t.diameter, t.last_seen = boxes[bi].centre, boxes[bi].diameter, frame_index
                out[bi] = (t.id, False)
                used_t.add(ti)
        for bi, b in enumerate(boxes):
            if out[bi] is None:
                self.tracks.append(_Track(self._next, b.centre, b.diameter, frame_index))
                out[bi] = (self._next, True)
                self._next += 1
        return out  # type: ignore[return-value]

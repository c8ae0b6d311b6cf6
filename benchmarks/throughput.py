"""``bmc bench edge``: frames and cells per second of the real edge pipeline, stage by stage.

Runs :class:`bmc.edge_app.session.EdgeSession` headless on a folder or video — the same code the device
runs: read, find cells, preprocess, classify, record (SQLite + crops) — into a temporary session
folder, and reports fps, cells/s and the time per frame of each stage.
"""

from __future__ import annotations

import os
import tempfile

from bmc.benchmarks import machine


def run(
    source: str,
    model: str | None = None,
    threads: int | None = None,
    save_crops: bool = True,
    orientations: int | None = None,
) -> dict:
    from bmc.edge_app.classifier import DEFAULT_MODEL, DEFAULT_ORIENTATIONS, CellClassifier
    from bmc.edge_app.session import STAGES, EdgeSession, SessionConfig

    clf = CellClassifier(
        model or DEFAULT_MODEL, threads=threads or os.cpu_count(), orientations=orientations or DEFAULT_ORIENTATIONS
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = EdgeSession(
            source,
            clf,
            tmp,
            SessionConfig(headless=True, save_crops=save_crops, print_every_s=1e9),
            echo=lambda m: None,
        ).run()
    per_frame = {s: 1000 * r.stage_seconds[s] / max(r.frames, 1) for s in STAGES}
    return {
        "machine": machine.describe(),
        "model": clf.path.name,
        "orientations": clf.orientations,
        "source": source,
        "threads": threads or os.cpu_count(),
        "frames": r.frames,
        "cells": r.cells,
        "seconds": r.seconds,
        "fps": r.fps,
        "cells_per_s": r.cells / r.seconds if r.seconds else 0.0,
        "stage_ms_per_frame": per_frame,
        "corrupt_frames": r.corrupt_frames,
    }


def markdown(res: dict) -> str:
    st = res["stage_ms_per_frame"]
    return (
        f"edge pipeline on {res['source']} with {res['model']} ({res['threads']} threads, "
        f"{res.get('orientations', 1)} orientations per cell): "
        f"{res['frames']} frames, {res['cells']} cells in {res['seconds']:.1f} s → **{res['fps']:.1f} frames/s**, "
        f"{res['cells_per_s']:.1f} cells/s\n\n| stage | ms/frame |\n|---|---:|\n"
        + "\n".join(f"| {k} | {v:.2f} |" for k, v in st.items())
    )

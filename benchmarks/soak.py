"""The kill soak (``bmc bench soak``): a session folder that survives SIGKILLs at random moments.

``kills`` times: start ``bmc edge run SOURCE --out DIR`` as its own process, SIGKILL it after a
random delay (during start-up, while frames are committed, or while it closes), and check the
folder: SQLite's integrity check, and every frame committed before the kill still there. Then
run to the end, and check that every field of the source was recorded exactly once in one session,
and that the resumed session found, cut and called the same cells as a run straight through.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bmc.edge_app import sessiondb
from bmc.edge_app.sources import IMAGE_SUFFIXES


def _frames(folder: Path) -> set[tuple[int, str]]:
    if not sessiondb.path_of(folder).exists():
        return set()
    db = sessiondb.connect(folder)
    try:
        return {(idx, source) for idx, source, _ in sessiondb.frames(db)}
    except sqlite3.OperationalError:  # killed before the tables were created
        return set()
    finally:
        db.close()


def _cells(folder: Path) -> list[tuple]:
    """Each recorded cell's field, box and call: what two runs over one source must agree on."""
    db = sessiondb.connect(folder)
    try:
        return sorted((c.source, *c.box, c.model_label, c.flag) for c in sessiondb.cells(db))
    finally:
        db.close()


def _integrity(folder: Path) -> str:
    db = sessiondb.connect(folder)
    try:
        return sessiondb.integrity(db)
    finally:
        db.close()


def run(
    source: str | Path, out: str | Path, kills: int = 100, max_delay_s: float = 6.0, seed: int = 0, log=print
) -> dict:
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: the soak needs a fresh session folder")
    fields = sorted(f.name for f in source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "bmc.cli", "edge", "run", str(source), "--out", str(out), "--headless", "--no-crops"]
    db_path = sessiondb.path_of(out)
    lost = bad = finished_early = 0
    t0 = time.perf_counter()
    for k in range(kills):
        before = _frames(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, max_delay_s))
            finished_early += 1  # it ran to the end before the kill came
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        after = _frames(out)
        lost += len(before - after)
        if db_path.exists():
            bad += _integrity(out) != "ok"
        if (k + 1) % 10 == 0:
            log(
                f"{k + 1} kills: {len(after)} of {len(fields)} fields recorded, {lost} committed frames lost, "
                f"{bad} integrity failures"
            )
        if finished_early and len(after) == len(fields):
            break
    final = subprocess.run(cmd, capture_output=True, text=True)
    # the same source straight through, without a kill: a resumed session must find the same cells
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*cmd[:7], str(Path(tmp) / "whole"), *cmd[8:]], capture_output=True, text=True)
        whole = _cells(Path(tmp) / "whole")
    resumed = _cells(out)
    db = sessiondb.connect(out)
    try:
        recorded_frames = sessiondb.frames(db)
        per_field = Counter(source for _, source, _ in recorded_frames)
        recorded = sessiondb.sessions(db)
        sessions, status = len(recorded), recorded[-1].status
        cells = len(sessiondb.cells(db))
        in_frames = sum(n for _, _, n in recorded_frames)
        integrity = sessiondb.integrity(db)
    finally:
        db.close()
    return {
        "kills": k + 1,
        "fields": len(fields),
        "seconds": time.perf_counter() - t0,
        "committed_frames_lost": lost,
        "integrity_failures": bad + (integrity != "ok"),
        "fields_recorded": len(per_field),
        "fields_recorded_twice": sum(v > 1 for v in per_field.values()),
        "fields_missing": len(set(fields) - set(per_field)),
        "sessions": sessions,
        "final_status": status,
        "cells_match_frames": cells == in_frames,
        "final_exit": final.returncode,
        "ran_to_the_end_before_a_kill": finished_early,
        "cells_as_uninterrupted": resumed == whole,
        "cells_differing_from_uninterrupted": len(set(resumed) ^ set(whole)),
    }


def markdown(r: dict) -> str:
    return "\n".join(
        [
            f"{r['kills']} SIGKILLs at random moments over {r['seconds'] / 60:.1f} min, then a run to the end:",
            f"- committed frames lost: {r['committed_frames_lost']}",
            f"- integrity failures: {r['integrity_failures']}",
            f"- fields recorded: {r['fields_recorded']} of {r['fields']}; twice: {r['fields_recorded_twice']}; "
            f"missing: {r['fields_missing']}",
            f"- sessions in the folder: {r['sessions']} (last status {r['final_status']}); cells match their frames: "
            f"{r['cells_match_frames']}; final exit status {r['final_exit']}",
            f"- the same cells as one run straight through: {r['cells_as_uninterrupted']} "
            f"({r['cells_differing_from_uninterrupted']} differ)",
        ]
    )

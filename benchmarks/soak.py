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

from bmc.edge_app.sources import IMAGE_SUFFIXES


def _frames(db_path: Path) -> set[tuple[int, str]]:
    if not db_path.exists():
        return set()
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return set(db.execute("SELECT idx, source FROM frame"))
    except sqlite3.OperationalError:  # killed before the tables were created
        return set()
    finally:
        db.close()


def _cells(db_path: Path) -> list[tuple]:
    """Each recorded cell's field, box and call: what two runs over one source must agree on."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT source, x, y, w, h, label, flag FROM cell ORDER BY source, x, y").fetchall()
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
    db_path = out / "session.sqlite"
    lost = bad = finished_early = 0
    t0 = time.perf_counter()
    for k in range(kills):
        before = _frames(db_path)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, max_delay_s))
            finished_early += 1  # it ran to the end before the kill came
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        after = _frames(db_path)
        lost += len(before - after)
        if db_path.exists():
            db = sqlite3.connect(db_path)
            bad += db.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
            db.close()
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
        whole = _cells(Path(tmp) / "whole" / "session.sqlite")
    resumed = _cells(db_path)
    db = sqlite3.connect(db_path)
    per_field = Counter(s for (s,) in db.execute("SELECT source FROM frame"))
    sessions = db.execute("SELECT COUNT(*) FROM session").fetchone()[0]
    status = db.execute("SELECT status FROM session ORDER BY id DESC").fetchone()[0]
    cells = db.execute("SELECT COUNT(*) FROM cell").fetchone()[0]
    in_frames = db.execute("SELECT COALESCE(SUM(n_cells), 0) FROM frame").fetchone()[0]
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
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

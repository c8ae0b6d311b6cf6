"""Results kept: every benchmark run appends rows, with the machine's description, to
``benchmarks/results/<kind>.csv``."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path


def _results_dir() -> Path:
    """``benchmarks/results`` in a repository checkout; where the user runs (``./bmc-results``) when
    bmc is installed as a package, never inside site-packages; ``BMC_RESULTS`` overrides both."""
    import os

    if os.environ.get("BMC_RESULTS"):
        return Path(os.environ["BMC_RESULTS"])
    here = Path(__file__).resolve().parent
    return here / "results" if (here.parent / "pyproject.toml").is_file() else Path.cwd() / "bmc-results"


RESULTS_DIR = _results_dir()


def append(kind: str, rows: list[dict], machine: dict, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{kind}.csv"
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    mach = f"{machine.get('cpu')} ({machine.get('cores')} cores, {machine.get('arch')})"
    flat = [
        {"time": when, "machine": mach, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}} for r in rows
    ]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    exists = path.exists()
    if exists:
        with open(path, newline="") as fh:
            old_fields = next(csv.reader(fh), [])
        fields = old_fields + [f for f in fields if f not in old_fields]
        if fields != old_fields:  # new columns: rewrite with the wider header
            old = list(csv.DictReader(open(path, newline="")))
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fields)
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        if not exists:
            w.writeheader()
        w.writerows(flat)
    return path

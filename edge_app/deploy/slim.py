"""Remove from a device's virtual environment what the edge app never loads.

The device is an appliance: it runs ``bmc edge`` and nothing else, on a small SD card. Each rule
below names files that the installed wheels carry for other uses, and why bmc does not need
them. ``install.sh`` applies them after ``pip install``; ``check_wheels.py --size`` applies the
same rules before it measures; ``tests/test_edge_install.py`` runs the edge app in a slimmed
environment, so a rule that removes something the app needs fails a test.

    python edge_app/deploy/slim.py SITE_PACKAGES [--dry-run]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# (glob relative to site-packages, why the device does not need it)
RULES = [
    (
        "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
        "LiteRT's WebGPU accelerator for its CompiledModel API; bmc runs the Interpreter on the CPU (XNNPACK)",
    ),
    ("numpy/**/tests", "numpy's own test suite"),
    ("numpy/tests", "numpy's own test suite"),
    ("numpy/f2py", "numpy's Fortran-to-Python interface generator, a developer's tool (imported only on demand)"),
    ("numpy/**/*.pyi", "type stubs, read by type checkers, never at run time"),
    ("cv2/**/*.pyi", "type stubs, read by type checkers, never at run time"),
    (
        "cv2/data/*.xml",
        "OpenCV's Haar cascades (faces, eyes, number plates) for its CascadeClassifier; bmc finds cells by their stain",
    ),
]


def size_bytes(p: Path) -> int:
    """Bytes of a file, or of the regular files under a folder (links not followed)."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return p.stat().st_size


def slim(site_packages: str | Path, dry_run: bool = False) -> list[tuple[str, float, str]]:
    """Apply :data:`RULES`; (path, MB freed, reason) for what was (or would be) removed."""
    site = Path(site_packages)
    if not (site / "bmc" / "edge_app").is_dir():
        raise FileNotFoundError(f"{site}: not a site-packages folder with bmc's edge_app installed")
    removed = []
    for pattern, why in RULES:
        for p in sorted(site.glob(pattern)):
            if not p.exists():  # inside a folder an earlier match removed
                continue
            removed.append((str(p.relative_to(site)), size_bytes(p) / 1e6, why))
            if not dry_run:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site_packages")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    try:
        removed = slim(a.site_packages, a.dry_run)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, mb, why in removed:
        print(f"{'would remove' if a.dry_run else 'removed'} {path} ({mb:.1f} MB): {why}")
    print(f"{sum(mb for _, mb, _ in removed):.1f} MB {'would be ' if a.dry_run else ''}freed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

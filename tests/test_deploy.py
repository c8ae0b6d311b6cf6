"""Device configuration, storage rotation, export, doctor and the arm64 wheel check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bmc.edge_app import config as config_mod
from bmc.edge_app.service import EXPORTED_MARK, rotate, session_dirs

from conftest import ROOT, bmc

EXAMPLE = ROOT / "edge_app" / "deploy" / "bmc.toml"


def test_example_config_loads_with_its_values():
    cfg = config_mod.load(EXAMPLE)
    assert cfg.camera.source == "/dev/bmc-camera" and cfg.camera.fourcc == "MJPG"
    assert cfg.session.target == 200 and cfg.finder.min_area_px == 2000 and cfg.review.min_confidence == 0.6
    assert cfg.model.orientations == 4


def test_the_examples_review_keys_load_as_written(tmp_path):
    """The example's commented ``[screen] keys`` line, switched on, is a config the device takes."""
    text = EXAMPLE.read_text()
    line = next(l for l in text.splitlines() if l.startswith("# keys = {"))
    p = tmp_path / "bmc.toml"
    p.write_text(text.replace(line, line[2:]))
    cfg = config_mod.load(p)
    assert cfg.screen.keys == {"segmented": "s", "band": "d", "lymphocyte": "l", "monocyte": "m", "eosinophil": "e"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[camera]\nsorce = '0'\n", "unknown key 'sorce' in \\[camera\\]; did you mean 'source'"),
        ("[camra]\nsource = '0'\n", "unknown section \\[camra\\]; did you mean \\[camera\\]"),
        ("[session]\ntarget = 'lots'\n", "target must be an int, got 'lots'"),
        ("[session]\nmode = 'slide'\n", "mode must be one of 'field', 'cell', got 'slide'"),
        ("[finder]\nmin_area_px = -3\n", "min_area_px must be >= 0"),
        ("[storage\n", "not valid TOML"),
        ("[model]\norientations = 3\n", "orientations must be one of 1, 2, 4, 8, got 3"),
        ("[screen]\nkeys = 'n'\n", "keys must be a table, e.g."),
        ("[model]\npath = '/nonexistent/m.tflite'\n", "\\[model\\] path '/nonexistent/m.tflite': no such model file"),
        ("[screen]\nkeys = { neutrophil = 3 }\n", "keys.neutrophil must be a str, got 3"),
        ("[screen]\nkeys = { neutrophil = 'b' }\n", "keys.neutrophil must be one character other than"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    p = tmp_path / "bmc.toml"
    p.write_text(text)
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.load(p)


def _session(root: Path, name: str, exported: bool) -> Path:
    s = root / name
    s.mkdir(parents=True)
    import sqlite3

    from bmc.edge_app.sessiondb import SCHEMA

    db = sqlite3.connect(s / "session.sqlite")
    db.executescript(SCHEMA)
    db.close()
    if exported:
        (s / EXPORTED_MARK).write_text("done\n")
    return s


def test_rotation_removes_oldest_exported_sessions_and_never_unexported(tmp_path):
    a = _session(tmp_path, "20260101-0900", exported=False)
    b = _session(tmp_path, "20260102-0900", exported=True)
    c = _session(tmp_path, "20260103-0900", exported=True)
    d = _session(tmp_path, "20260104-0900", exported=False)
    fullness = iter([95.0, 93.0, 88.0])  # each removal frees some space

    removed = rotate(tmp_path, 90.0, 0.0, usage=lambda p: (next(fullness), 1e6))
    assert removed == [b]  # 95%: a is unexported, kept; 93%: b removed; then 88%: done
    assert a.exists() and c.exists() and d.exists() and not b.exists()
    # the disk stays full: the last exported session goes, the unexported ones never do
    removed = rotate(tmp_path, 90.0, 0.0, usage=lambda p: (99.0, 1.0))
    assert removed == [c] and a.exists() and d.exists()
    assert rotate(tmp_path, 90.0, 0.0, usage=lambda p: (99.0, 1.0)) == []


def test_export_copies_a_session_and_marks_it(tmp_path, bccd):
    fields = tmp_path / "fields"
    fields.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:3]:
        (fields / f.name).symlink_to(f)
    session = tmp_path / "storage" / "20261125-1000"
    bmc("edge", "run", fields, "--out", session, "--headless")
    usb = tmp_path / "usb"
    usb.mkdir()
    p = bmc("edge", "export", session, "--to", usb)
    out = usb / session.name
    assert {"cells.csv", "report.html", "session.sqlite", "crops"} <= {x.name for x in out.iterdir()}
    assert (session / EXPORTED_MARK).exists() and "exported" in p.stdout
    assert session_dirs(tmp_path / "storage") == [session]
    missing = bmc("edge", "export", session, "--to", tmp_path / "not-mounted", check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_doctor_reports_what_is_wrong(tmp_path):
    cfg = tmp_path / "bmc.toml"
    cfg.write_text(f"[camera]\nsource = '/dev/v4l/by-id/usb-no-such-camera'\n[storage]\nfolder = '{tmp_path}/s'\n")
    p = bmc("edge", "doctor", "--config", cfg, check=False)
    assert p.returncode == 1
    assert "runtime: ai-edge-litert" in p.stdout and "model: bmc_pbc8_lite0_int8.tflite" in p.stdout
    assert "PROBLEM: camera /dev/v4l/by-id/usb-no-such-camera is not present" in p.stdout


@pytest.mark.slow
def test_edge_extra_resolves_for_arm64_without_tensorflow_within_200_mb(tmp_path):
    """Resolves and installs the real aarch64 wheels for each board's Python; the slimmed
    environment (what install.sh leaves) fits the 200 MB budget."""
    out = tmp_path / "wheels.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "edge_app" / "deploy" / "check_wheels.py"), "--size", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    res = json.loads(out.read_text())
    assert len(res) == 3
    for target, r in res.items():
        assert "ai-edge-litert" in r["packages"] and "opencv-python-headless" in r["packages"], target
        assert "opencv-python" not in r["packages"], target  # the GUI wheel would clash with headless
        assert "tensorflow" not in r["packages"]
        assert ("tomli" in r["packages"]) == ("3.10" in target), target  # TOML parser before 3.11
        size = r["size"]
        assert size["venv_mb"] <= 200, (target, size)
        # bmc (its one import root) holds the two int8 models (8-class default, stages) with their
        # guard sets, 9.8 MB, and its code with its bytecode (2 MB), not the float16 ones (6.8 MB each)
        assert size["packages_mb"]["bmc"] < 14, size
        assert size["slimmed_mb"] > 20, size


def test_a_batch_run_counts_with_the_devices_config_and_the_command_line_on_top(tmp_path, bccd):
    """``bmc edge run --config bmc.toml``: the device's [session], [review] and [model] settings, as the
    service counts with them; an option given on the command line overrides its setting."""
    import json
    import sqlite3

    fields = tmp_path / "fields"
    fields.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:3]:
        (fields / f.name).symlink_to(f)
    cfg = tmp_path / "bmc.toml"
    cfg.write_text(
        "[session]\ntarget = 100\nspecimen = 'marrow'\n[review]\nmin_confidence = 0.95\n[model]\norientations = 1\n"
    )

    def recorded(out):
        db = sqlite3.connect(out / "session.sqlite")
        config = json.loads(db.execute("SELECT config FROM session").fetchone()[0])
        db.close()
        return config

    p = bmc("edge", "run", fields, "--out", tmp_path / "a", "--headless", "--config", cfg, check=False)
    assert p.returncode == 3 and "target of 100 cells" in p.stderr  # the config's target, short
    a = recorded(tmp_path / "a")
    assert (a["target"], a["specimen"], a["review"]["min_confidence"], a["orientations"]) == (100, "marrow", 0.95, 1)
    p = bmc("edge", "run", fields, "--out", tmp_path / "b", "--headless", "--config", cfg, "--specimen", "blood",
            "--target", "2", "--orientations", "2", check=False)  # fmt: skip
    b = recorded(tmp_path / "b")
    assert (b["target"], b["specimen"], b["review"]["min_confidence"], b["orientations"]) == (2, "blood", 0.95, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text("[review]\nmin_confidence = 2\n")
    p = bmc("edge", "run", fields, "--out", tmp_path / "c", "--config", bad, check=False)
    assert p.returncode == 2 and "min_confidence must be between 0 and 1" in p.stderr and not (tmp_path / "c").exists()


def test_with_the_microscopes_scale_in_the_config_a_field_gives_the_same_cells_alone_as_in_a_session(tmp_path, bccd):
    """A long session's report gives the scale it settled on and the two settings that fix it; with them
    in bmc.toml, a field alone is found and called exactly as in a session of ten (without them, alone,
    it is cut at its own red cells' measure: BCCD 00010, a neutrophil's lobe found as a cell)."""
    import re
    import sqlite3

    names = [f"BloodImage_000{i}.jpg" for i in range(10, 20)]
    ten, alone = tmp_path / "ten", tmp_path / "alone"
    ten.mkdir()
    alone.mkdir()
    for n in names:
        (ten / n).symlink_to(bccd / "JPEGImages" / n)
    (alone / names[0]).symlink_to(bccd / "JPEGImages" / names[0])
    bmc("edge", "run", ten, "--out", tmp_path / "long", "--headless")
    report = (tmp_path / "long" / "report.html").read_text()
    red = re.search(r"\[finder\] red_cell_px = (\d+)", report).group(1)
    cut = re.search(r"\[session\] cell_diameter_px = (\d+)", report).group(1)
    cfg = tmp_path / "bmc.toml"
    cfg.write_text(f"[finder]\nred_cell_px = {red}\n[session]\ncell_diameter_px = {cut}\n")

    def cells(out, field=names[0]):
        db = sqlite3.connect(out / "session.sqlite")
        rows = db.execute("SELECT x, y, w, h, label, confidence, flag FROM cell WHERE source = ?", (field,)).fetchall()
        db.close()
        return rows

    bmc("edge", "run", alone, "--out", tmp_path / "a0", "--headless")
    bmc("edge", "run", alone, "--out", tmp_path / "a1", "--headless", "--config", cfg)
    bmc("edge", "run", ten, "--out", tmp_path / "t1", "--headless", "--config", cfg)
    assert cells(tmp_path / "a0") != cells(tmp_path / "long")  # its own measure alone: another count
    assert cells(tmp_path / "a1") == cells(tmp_path / "t1") and len(cells(tmp_path / "a1")) == 2
    assert "cells cut at" in (tmp_path / "a1" / "report.html").read_text()
    assert "[finder] red_cell_px =" not in (tmp_path / "a1" / "report.html").read_text()  # fixed: no advice

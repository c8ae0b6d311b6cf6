"""Counts that can be trusted under abuse: one process per session folder, killed sessions resumed
without counting a field twice, corrupt video frames skipped, configs and reports checked.

Real BCCD fields, the shipped model, real subprocesses and signals, real SQLite."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
from bmc.edge_app.report import build_report
from bmc.edge_app.session import EdgeSession, SessionConfig
from bmc.edge_app.sources import VideoFile

from conftest import ROOT, bmc


@pytest.fixture(scope="module")
def clf():
    return CellClassifier(DEFAULT_MODEL, threads=2)


@pytest.fixture(scope="module")
def fields40(bccd, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fields40")
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:40]:
        (d / f.name).symlink_to(f)
    return d


def _run(src, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "bmc.cli", "edge", "run", str(src), "--out", str(out), "--headless", *map(str, extra)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _frames(db_path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM frame").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_frames(db_path: Path, n: int, timeout: float = 120) -> int:
    deadline, got = time.time() + timeout, 0
    while time.time() < deadline and got < n:
        time.sleep(0.1)
        got = _frames(db_path) if db_path.exists() else 0
    return got


def test_a_killed_session_resumes_and_counts_every_field_once(fields40, tmp_path):
    out = tmp_path / "s"
    for k in range(3):  # killed three times at different points, then run to the end
        proc = _run(fields40, out)
        assert _wait_frames(out / "session.sqlite", 6 + 10 * k) >= 6 + 10 * k, "the run never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    db = sqlite3.connect(out / "session.sqlite")
    assert db.execute("SELECT status FROM session").fetchall() == [("running",)]  # left by the SIGKILL
    db.close()
    p = _run(fields40, out)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "resuming the interrupted session" in stdout
    db = sqlite3.connect(out / "session.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT id, status FROM session").fetchall() == [(1, "finished")]
    per_field = Counter(s for (s,) in db.execute("SELECT source FROM frame"))
    assert sorted(per_field) == sorted(f.name for f in fields40.iterdir())
    assert set(per_field.values()) == {1}, "a field recorded twice"
    assert (
        db.execute("SELECT COUNT(*) FROM cell").fetchone()[0]
        == db.execute("SELECT SUM(n_cells) FROM frame").fetchone()[0]
    )
    counted = db.execute(
        "SELECT COUNT(*) FROM cell WHERE flag = '' AND label NOT IN ('platelet', 'erythroblast')"
    ).fetchone()[0]
    db.close()
    # the summary counts the leukocytes of the whole session, those before the kills too
    assert f"{counted} leukocytes:" in stdout.splitlines()[-2] or f"{counted} leukocytes:" in stdout


def _cells(db_path: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return db.execute("SELECT source, x, y, w, h, label, flag FROM cell ORDER BY source, x, y").fetchall()


def test_an_interrupted_and_resumed_session_equals_an_uninterrupted_one(bccd, tmp_path):
    """Killed at a random frame and run again into its folder, a session finds, cuts and calls the
    same cells as one run straight through: the red cells' size and colour, the cells' scale and the
    lamp it had measured are restored from its database, not measured afresh from later fields."""
    src = tmp_path / "fields"
    src.mkdir()
    # 5 of the fields' first frames set the scale: a kill after them is where a fresh measure differs
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:80]:
        (src / f.name).symlink_to(f)
    whole = tmp_path / "whole"
    p = _run(src, whole, "--orientations", "1")
    assert p.wait(300) == 0
    cut = tmp_path / "cut"
    proc = _run(src, cut, "--orientations", "1")
    at = int(np.random.default_rng().integers(8, 40))
    assert _wait_frames(cut / "session.sqlite", at) >= at, "the run never got going"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = _run(src, cut, "--orientations", "1")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and "resuming the interrupted session" in stdout, stdout + stderr
    assert _cells(cut / "session.sqlite") == _cells(whole / "session.sqlite"), f"killed after frame {at}"


def test_a_finished_session_folder_is_not_counted_twice(fields40, tmp_path, clf):
    out = tmp_path / "s"
    bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "3")
    p = bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "3", check=False)
    assert p.returncode == 2 and "already holds a session" in p.stderr and "--new-session" in p.stderr
    db = sqlite3.connect(out / "session.sqlite")
    assert db.execute("SELECT COUNT(*) FROM session").fetchone()[0] == 1
    db.close()
    bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "3", "--new-session")
    db = sqlite3.connect(out / "session.sqlite")
    assert db.execute("SELECT COUNT(*) FROM session").fetchone()[0] == 2
    db.close()


def test_two_processes_never_record_into_one_folder(bccd, tmp_path):
    out, fields = tmp_path / "s", bccd / "JPEGImages"  # every field: the first still records when the second asks
    first = _run(fields, out)
    try:
        assert _wait_frames(out / "session.sqlite", 1) >= 1
        p = bmc("edge", "run", fields, "--out", out, "--headless", check=False)
        assert p.returncode == 2 and f"being recorded by another process (pid {first.pid})" in p.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    db = sqlite3.connect(out / "session.sqlite")
    assert db.execute("SELECT status FROM session").fetchall() == [("stopped",)]
    assert set(Counter(s for (s,) in db.execute("SELECT source FROM frame")).values()) == {1}
    db.close()


def test_a_killed_session_reads_as_interrupted(fields40, tmp_path):
    out = tmp_path / "s"
    proc = _run(fields40, out)
    assert _wait_frames(out / "session.sqlite", 3) >= 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    bmc("edge", "report", out)
    assert "<td>interrupted</td>" in (out / "report.html").read_text()
    # reviewing it (a writer) marks it for good
    first = next(iter(sqlite3.connect(out / "session.sqlite").execute("SELECT id FROM cell")))[0]
    bmc("edge", "review", out, "--cell", first, "--label", "rejected")
    assert sqlite3.connect(out / "session.sqlite").execute("SELECT status FROM session").fetchone()[0] == "interrupted"


def test_a_live_source_is_not_resumed(bccd, tmp_path, clf):
    from bmc.edge_app.store import SessionFolderError, SessionStore

    out = tmp_path / "s"
    s = SessionStore(out, "camera0", "m.tflite", "0" * 64, ["a", "b"])
    s.db.close()
    s._lock.close()  # as a SIGKILL leaves it: status 'running', lock released
    with pytest.raises(SessionFolderError, match="a live source cannot resume"):
        SessionStore(out, "camera0", "m.tflite", "0" * 64, ["a", "b"], resumable=False)


def _video(bccd: Path, path: Path, corrupt: int | None) -> int:
    files = sorted((bccd / "JPEGImages").glob("*.jpg"))[:12]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (640, 480))
    for f in files:
        w.write(cv2.imread(str(f)))
    w.release()
    if corrupt is not None:  # wipe the start of one frame's JPEG (its markers and tables)
        data = bytearray(path.read_bytes())
        starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
        k = starts[corrupt]
        data[k : k + 2000] = bytes(2000)
        path.write_bytes(bytes(data))
    return len(files)


def test_a_corrupt_video_frame_is_skipped_and_counted(bccd, tmp_path, clf):
    good = tmp_path / "good.avi"
    _video(bccd, good, None)
    readable = sum(1 for f in VideoFile(str(good)).frames() if f.image is not None)
    bad = tmp_path / "bad.avi"
    _video(bccd, bad, 4)
    frames = list(VideoFile(str(bad)).frames())
    assert [f.index for f in frames if f.image is None] == [4]
    assert sum(f.image is not None for f in frames) == readable - 1  # every other frame still read
    lines = []
    r = EdgeSession(str(bad), clf, tmp_path / "s", SessionConfig(save_crops=False), echo=lines.append).run()
    assert r.status == "finished" and r.corrupt_frames == 1 and r.frames == readable


def test_a_video_that_stops_decoding_says_where(bccd, tmp_path):
    bad = tmp_path / "bad.avi"
    _video(bccd, bad, None)
    src = VideoFile(str(bad), max_bad=3)
    data = bytearray(bad.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    for k in starts[3:9]:
        data[k : k + 2000] = bytes(2000)
    bad.write_bytes(bytes(data))
    src = VideoFile(str(bad), max_bad=3)
    frames = list(src.frames())
    assert [f.index for f in frames] == [0, 1, 2]
    assert "stopped after 3 unreadable frames in a row from frame 3 of 12" in src.end_reason


@pytest.mark.parametrize(
    "section,line,key",
    [
        ("model", "threads = -4", "threads"),
        ("session", "target = -5", "target"),
        ("review", "min_confidence = 5.0", "min_confidence"),
        ("session", "cell_diameter_px = -10", "cell_diameter_px"),
        ("camera", 'width = "wide"', "width"),
        ("camera", 'fps = "fast"', "fps"),
        ("camera", "fourcc = 1196444237", "fourcc"),
        ("finder", "max_cells = 0", "max_cells"),
    ],
)
def test_doctor_refuses_out_of_range_settings(tmp_path, section, line, key):
    cfg = tmp_path / "bmc.toml"
    cfg.write_text(f"[storage]\nfolder = '{tmp_path / 'sessions'}'\n[{section}]\n{line}\n")
    p = bmc("edge", "doctor", "--config", cfg, check=False)
    assert p.returncode == 1 and f"PROBLEM: {cfg}: [{section}] {key} must be" in p.stdout
    p = bmc("edge", "serve", "--config", cfg, check=False, timeout=60)
    assert p.returncode == 2 and f"[{section}] {key} must be" in p.stderr


def test_run_blames_a_bad_option_not_the_model(fields40, tmp_path):
    for opt, value in [("--threads", "-4"), ("--target", "-5"), ("--cell-diameter", "-10")]:
        p = bmc("edge", "run", fields40, "--out", tmp_path / "s", "--headless", opt, value, check=False)
        assert p.returncode == 2 and opt in p.stderr and "model" not in p.stderr.lower()
        assert not (tmp_path / "s").exists()


def test_sigterm_is_honoured_when_a_target_ends_each_session(fields40, tmp_path):
    """A service whose sessions end at once (a target of 1) still stops on SIGTERM, whenever it comes:
    a signal that lands while a session closes (its own handler installed, its target reached) is
    the service's too. The signal is sent as a session writes its files; five tries."""
    for attempt in range(5):
        folder = tmp_path / f"sessions{attempt}"
        cfg = tmp_path / f"bmc{attempt}.toml"
        cfg.write_text(
            f"[camera]\nsource = '{fields40}'\n[session]\ntarget = 1\nprint_every_s = 1\n[storage]\nfolder = '{folder}'\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "bmc.cli", "edge", "serve", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # the signal as a session writes its files, past its last look at the stop flag: the moment
        # its tables are there and its report not yet
        deadline = time.time() + 120
        in_window = False
        while time.time() < deadline and proc.poll() is None:
            if any((d / "cells.csv").exists() and not (d / "report.html").exists() for d in folder.glob("*")):
                in_window = True
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        if not in_window:  # the window never seen: this try tests nothing
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"no session was seen writing its files (try {attempt}, exit {proc.returncode}): {err[-2000:]}")
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # the signal lost: no service left behind
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0
        n = len(list(folder.glob("*")))
        time.sleep(0.5)
        assert len(list(folder.glob("*"))) == n  # nothing after the signal


def test_report_embeds_only_the_sessions_own_files(fields40, tmp_path):
    out = tmp_path / "s"
    bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "4")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(cv2.imencode(".jpg", np.full((8, 8, 3), 7, np.uint8))[1].tobytes())
    (out / "crops" / "link.jpg").symlink_to(secret)
    db = sqlite3.connect(out / "session.sqlite")
    ids = [i for (i,) in db.execute("SELECT id FROM cell ORDER BY id LIMIT 4")]
    assert len(ids) == 4
    for cid, crop in zip(ids, ["/etc/passwd", "../secret.jpg", "crops/../../secret.jpg", "crops/link.jpg"]):
        db.execute("UPDATE cell SET crop = ? WHERE id = ?", (crop, cid))
    db.commit()
    db.close()
    import base64

    html = build_report(out).read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in html
    assert base64.b64encode(Path("/etc/passwd").read_bytes()).decode()[:40] not in html
    assert html.count("not in session") >= 4


def test_full_disk_during_report_leaves_no_empty_file(fields40, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "s"
        bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "2", "--no-crops")
        (out / "report.html").unlink(missing_ok=True)
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        p = bmc("edge", "report", out, check=False)
        assert p.returncode == 2 and "disk is full" in p.stderr and "Traceback" not in p.stderr
        assert not (out / "report.html").exists()
        assert not list(out.glob(".report.html.*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_report_in_a_read_only_folder_names_the_file_it_could_not_write(fields40, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "s"
        bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "2", "--no-crops")
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        p = bmc("edge", "report", out, check=False)
        line = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert line.startswith(f"error: {out}/") and "Read-only file system" in line and ".tmp" not in line, line
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_oversized_frame_is_refused_and_a_grey_source_warned(bccd, tmp_path, clf):
    src = tmp_path / "src"
    src.mkdir()
    field = cv2.imread(str(sorted((bccd / "JPEGImages").glob("*.jpg"))[0]))
    cv2.imwrite(str(src / "a_huge.png"), np.zeros((7000, 6000, 3), np.uint8))  # 42 MP
    cv2.imwrite(str(src / "b_field.jpg"), field)
    lines = []
    r = EdgeSession(str(src), clf, tmp_path / "s", SessionConfig(save_crops=False), echo=lines.append).run()
    assert r.corrupt_frames == 1 and r.frames == 2 and r.cells >= 1
    db = sqlite3.connect(tmp_path / "s" / "session.sqlite")
    assert (
        "over the 40-megapixel limit" in db.execute("SELECT error FROM frame WHERE source = 'a_huge.png'").fetchone()[0]
    )
    db.close()
    report = (tmp_path / "s" / "report.html").read_text()
    assert "(1 unreadable: a_huge.png (" in report and "over the 40-megapixel limit" in report  # named, with why
    assert "a_huge.png frame" not in report  # a file of a folder: no frame number
    grey = tmp_path / "grey"
    grey.mkdir()
    cv2.imwrite(str(grey / "f.jpg"), cv2.cvtColor(cv2.cvtColor(field, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))
    lines = []
    EdgeSession(str(grey), clf, tmp_path / "g", SessionConfig(save_crops=False), echo=lines.append).run()
    assert any("looks greyscale" in l for l in lines)


def test_data_check_names_empty_classes_and_tiny_images(pbc, tmp_path):
    d = tmp_path / "d"
    (d / "blast").mkdir(parents=True)  # a class folder nobody filled
    (d / "neutrophil").mkdir()
    for f in sorted((pbc / "neutrophil").glob("*.jpg"))[:3]:
        (d / "neutrophil" / f.name).symlink_to(f)
    cv2.imwrite(str(d / "neutrophil" / "tiny.jpg"), np.full((20, 24, 3), 200, np.uint8))
    p = bmc("data", "check", d)
    assert "empty class folders (no image; not a class until it has some): blast" in p.stdout
    assert "too small to hold a cell" in p.stdout and "tiny.jpg: 24x20" in p.stdout


def test_evaluate_lists_skipped_files_on_screen(pbc, tmp_path):
    d = tmp_path / "d" / "neutrophil"
    d.mkdir(parents=True)
    for f in sorted((pbc / "neutrophil").glob("*.jpg"))[:3]:
        (d / f.name).symlink_to(f)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    p = bmc("evaluate", DEFAULT_MODEL, d.parent)
    assert "broken.jpg" in p.stderr and "1 unreadable image(s) left out" in p.stdout


def test_sigterm_stops_a_service_that_waits_for_its_camera(tmp_path):
    cfg = tmp_path / "bmc.toml"
    cfg.write_text(f"[camera]\nsource = '/dev/video-unplugged'\n[storage]\nfolder = '{tmp_path / 'sessions'}'\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bmc.cli", "edge", "serve", "--config", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    while "waiting for the camera" not in line and line:
        line = proc.stdout.readline()
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.time() - t0 < 10 and "stopping the service" in out


def test_every_domain_error_is_one_kind_caught_once_by_the_cli():
    import importlib

    from bmc.errors import BmcError

    errors = {
        "bmc.contract": ["ContractError", "ImageError"],
        "bmc.card": ["ModelCardError"],
        "bmc.train.data": ["DataError"],
        "bmc.train.cellscale": ["CellScaleError"],
        "bmc.train.trainer": ["TrainError"],
        "bmc.train.evaluate": ["EvaluationError"],
        "bmc.convert.embedding": ["EmbeddingError"],
        "bmc.edge_app.review": ["ReviewError"],
        "bmc.edge_app.config": ["ConfigError"],
        "bmc.edge_app.backends": ["BackendError"],
        "bmc.edge_app.sources": ["SourceError"],
        "bmc.edge_app.meters": ["MeterError"],
        "bmc.edge_app.store": ["SessionFolderError"],
        "bmc.edge_app.adapt": ["AdaptError"],
        "bmc.edge_app.unknown": ["UnknownError"],
        "bmc.benchmarks.finding": ["BoxesError"],
        "bmc.benchmarks.adapt": ["TruthError"],
        "bmc.benchmarks.ood": ["OodError"],
    }
    for module, names in errors.items():
        for name in names:
            assert issubclass(getattr(importlib.import_module(module), name), BmcError), f"{module}.{name}"
    # one raised deep inside a verb, not through a per-verb table: one line, exit 2, no traceback
    p = bmc("edge", "review", "/nonexistent-folder", "--list", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_training_and_gate_defaults_are_written_once():
    import dataclasses

    import click

    from bmc.cli import main
    from bmc.convert.gate import Gate
    from bmc.train.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    train_cmd = main.commands["train"]
    options = {p.name: p.default for p in train_cmd.params if isinstance(p, click.Option)}
    shared = set(options) & set(fields)
    assert len(shared) >= 18
    for name in shared:
        if fields[name] is not None and fields[name] is not dataclasses.MISSING:  # no default: None or required
            assert options[name] == fields[name], name
    # the hidden clamps are settings now, recorded in every run's config.json
    assert fields["head_patience"] == 5 and fields["full_head_epochs"] == 10
    convert = {p.name: p.default for p in main.commands["convert"].params if isinstance(p, click.Option)}
    assert (convert["max_drop"], convert["max_class_drop"]) == (Gate.max_drop, Gate.max_class_drop)


def test_the_version_is_written_once():
    from importlib.metadata import version

    import tomllib

    import bmc

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert version("bmc-edge") == bmc.__version__


def test_the_session_files_are_readable_by_others_as_the_crops_are(fields40, tmp_path):
    """report.html, the CSVs and the FHIR file are read by a LIS connector or a file share: they get
    the mode the umask gives any file (the crops' and the database's), not a temporary file's 0600."""
    out = tmp_path / "s"
    bmc("edge", "run", fields40, "--out", out, "--headless", "--max-frames", "2")
    bmc("edge", "report", out, "--fhir")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("report.html", "cells.csv", "differential.csv", "differential.fhir.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name

"""Reviewing the cells a session set aside, on a real session of BCCD fields with the shipped model."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bmc.edge_app import review
from bmc.edge_app.cells import Box, CellCall
from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
from bmc.edge_app.review import REJECTED, Reviewer, ReviewError, review_window
from bmc.edge_app.store import SessionStore

from conftest import ROOT, bmc, recorded_session


@pytest.fixture(scope="module")
def recorded(bccd, tmp_path_factory) -> Path:
    """A real session folder: 24 BCCD fields (another microscope: many cells are set aside)."""
    return recorded_session(sorted((bccd / "JPEGImages").glob("*.jpg"))[:24], tmp_path_factory)


@pytest.fixture
def session(recorded, tmp_path) -> Path:
    out = tmp_path / "s"
    shutil.copytree(recorded, out)
    return out


def _csv(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "cells.csv")))


def _manifest(dest: Path) -> list[dict]:
    return list(csv.DictReader(open(dest / "manifest.csv")))


def _reviews(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "session.sqlite")
    rows = db.execute("SELECT cell_id, label, reviewer FROM review ORDER BY id").fetchall()
    db.close()
    return rows


def test_decisions_enter_the_differential_csv_and_report(session):
    before = _csv(session)
    flagged = [r for r in before if r["flag"]]
    sure = [r for r in before if not r["flag"]]
    assert len(flagged) >= 4 and sure, "the fixture needs cells set aside and cells counted"
    assert all(r["counted_as"] == "" for r in flagged) and all(r["counted_as"] == r["label"] for r in sure)

    # --list writes the decisions file to fill in: the cells waiting, their label column empty
    listed = list(csv.DictReader(bmc("edge", "review", session, "--list").stdout.splitlines()))
    assert [r["id"] for r in listed] == [r["id"] for r in flagged] and not any(r["label"] for r in listed)
    assert [r["model_label"] for r in listed] == [r["label"] for r in flagged]

    a, b, c, d = flagged[:4]
    bmc("edge", "review", session, "--cell", a["id"], "--label", "Monocyte", "--by", "anna")
    listed[1]["label"], listed[2]["label"] = "lymphocyte", REJECTED  # d (listed[3]) left blank
    decisions = session / "decisions.csv"
    with open(decisions, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(listed[0]))
        w.writeheader()
        w.writerows(listed[1:4])
    p = bmc("edge", "review", session, "--apply", decisions, "--by", "ben")
    assert "2 decisions recorded" in p.stdout and "; 1 row(s) with no label left undecided" in p.stdout
    # the session's own table is not a decisions file: its labels are the model's
    p = bmc("edge", "review", session, "--apply", session / "cells.csv", check=False)
    assert p.returncode == 2 and "cells.csv, whose labels are the model's calls" in p.stderr

    after = {r["id"]: r for r in _csv(session)}
    assert (after[a["id"]]["reviewed_label"], after[a["id"]]["reviewed_by"], after[a["id"]]["counted_as"]) == (
        "monocyte",
        "anna",
        "monocyte",
    )
    assert after[b["id"]]["counted_as"] == "lymphocyte" and after[b["id"]]["reviewed_by"] == "ben"
    assert after[c["id"]]["reviewed_label"] == REJECTED and after[c["id"]]["counted_as"] == ""
    assert after[d["id"]]["reviewed_label"] == ""  # left undecided in the file: still waiting
    assert after[a["id"]]["label"] == a["label"]  # the model's call is kept beside the decision

    page = (session / "report.html").read_text()  # rewritten by the review
    # a blood differential: per 100 leukocytes (the platelets and erythroblasts counted apart)
    leukocytes = sum(r["label"] not in ("platelet", "erythroblast") for r in sure) + 2
    assert f"Blood differential: <b>{leukocytes}</b> leukocytes counted (2 cells named by a reviewer)" in page
    assert f"Cells waiting for review ({len(flagged) - 3}" in page and "1 rejected in review" in page
    assert f"cell {a['id']}<br>model: {a['label']}" in page

    # undo: the cell goes back to waiting, and the trail keeps both rows
    bmc("edge", "review", session, "--cell", a["id"], "--undo", "--by", "anna")
    assert _csv(session)[int(a["id"]) - 1]["counted_as"] == ""
    assert [r for r in _reviews(session) if r[0] == int(a["id"])] == [
        (int(a["id"]), "monocyte", "anna"),
        (int(a["id"]), None, "anna"),
    ]


def test_bad_decisions_are_refused_and_record_nothing(session):
    first, second = (r["id"] for r in _csv(session)[:2])
    bad = session / "bad.csv"
    bad.write_text(f"id,label\n{first},neutrophil\n{second},monocite\n")
    p = bmc("edge", "review", session, "--apply", bad, check=False)
    assert p.returncode == 2 and "bad.csv:3: 'monocite' is not a label" in p.stderr
    assert _reviews(session) == []  # the good line before it was not recorded either

    # one cell decided twice in one file is ambiguous: refused, nothing recorded
    bad.write_text(f"id,label\n{first},neutrophil\n{first},monocyte\n")
    p = bmc("edge", "review", session, "--apply", bad, check=False)
    assert p.returncode == 2 and "bad.csv:3: cell " + first + " is decided a second time" in p.stderr
    bad.write_text(f"id,label,label\n{first},neutrophil,monocyte\n")
    p = bmc("edge", "review", session, "--apply", bad, check=False)
    assert p.returncode == 2 and "'label' appear more than once" in p.stderr
    assert _reviews(session) == []

    p = bmc("edge", "review", session, "--cell", "99999", "--label", "neutrophil", check=False)
    assert p.returncode == 2 and "no cell 99999" in p.stderr
    p = bmc("edge", "review", session, "--cell", first, "--label", "blast", check=False)
    assert p.returncode == 2 and "--new-label" in p.stderr
    p = bmc("edge", "review", session / "nowhere", "--list", check=False)
    assert p.returncode == 2 and "no session.sqlite" in p.stderr
    no_screen = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = bmc("edge", "review", session, check=False, env=no_screen)
    assert p.returncode == 2 and "--apply" in p.stderr

    # a class the model does not know, asked for explicitly: counted and listed in the report
    bmc("edge", "review", session, "--cell", first, "--label", "blast", "--new-label")
    assert _csv(session)[0]["counted_as"] == "blast"
    assert "<td>blast</td><td class='num'>1</td>" in (session / "report.html").read_text()


def test_review_window_keys(session):
    """The window's loop driven by recorded key presses (a CI machine has no screen)."""
    shown = []
    keys = iter([ord("2"), 13, ord("x"), ord("b"), ord("n"), ord("?"), ord("1"), ord("q")])
    with Reviewer(session, "carla") as r:
        todo = review.queue(r.cells())
        n = review_window(r, show=shown.append, wait_key=lambda: next(keys), echo=lambda m: None)
        labels = todo[0].labels
    # 2 → second label; Enter → the model's call; x → rejected, then b withdraws it and shows that
    # cell again; n skips it; ? is no key; 1 → the first label for the next cell; q ends
    assert n == 3
    assert _reviews(session) == [
        (todo[0].id, labels[1], "carla"),
        (todo[1].id, todo[1].model_label, "carla"),
        (todo[2].id, REJECTED, "carla"),
        (todo[2].id, None, "carla"),
        (todo[3].id, labels[0], "carla"),
    ]
    assert len(shown) == 8 and all(img.ndim == 3 and img.dtype == np.uint8 for img in shown)
    assert np.array_equal(shown[2], shown[4]) and not np.array_equal(shown[2], shown[3])  # b: that cell again
    assert np.array_equal(shown[5], shown[6])  # an unassigned key: the same cell again
    with Reviewer(session) as r:
        statuses = {c.id: c.status for c in r.cells()}
    assert statuses[todo[2].id] == "pending" and statuses[todo[0].id] == "reviewed"


def test_review_while_the_session_is_still_recording(session, tmp_path):
    """A reviewer and a running session write to the same database (WAL) without losing either."""
    out = tmp_path / "live"
    store = SessionStore(out, "camera0", DEFAULT_MODEL.name, "0" * 64, ["lymphocyte", "neutrophil"])
    cell = CellCall(Box(1, 2, 30, 30), "neutrophil", 0.5, np.array([0.5, 0.5]), flag="top two within 0.00", track=1)
    store.record_frame(0, "f0", [cell], [None])
    with Reviewer(out, "dana") as r:
        r.decide(1, "lymphocyte")
        store.record_frame(1, "f1", [cell], [None])  # the session goes on while the reviewer works
        r.decide(2, "neutrophil")
        with pytest.raises(ReviewError, match="not a label"):
            r.decide(2, "eosinophil")
    store.close()
    rows = _csv(out)
    assert [r["counted_as"] for r in rows] == ["lymphocyte", "neutrophil"]


def test_two_moving_cells_with_the_same_best_view_keep_their_own_crops(bccd, tmp_path):
    """Two cells judged in different frames whose best view was the same earlier frame: each keeps
    its own crop file (named by that view's frame, the second overwrote the first)."""
    import cv2

    field = cv2.imread(str(sorted((bccd / "JPEGImages").glob("*.jpg"))[0]))
    a, b = field[:64, :64].copy(), field[100:164, 100:164].copy()
    store = SessionStore(tmp_path / "s", "camera0", DEFAULT_MODEL.name, "0" * 64, ["lymphocyte", "neutrophil"])
    for idx, crop, track in ((10, a, 1), (11, b, 2)):
        cell = CellCall(Box(1, 2, 30, 30), "neutrophil", 0.9, np.array([0.1, 0.9]), track=track, frame=7)
        store.record_frame(idx, "cam", [cell], [crop])
    store.close()
    rows = _csv(tmp_path / "s")
    assert len({r["crop"] for r in rows}) == 2
    for r, want in zip(rows, (a, b)):
        got = cv2.imread(str(tmp_path / "s" / r["crop"]))
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 8  # its own cell, through JPEG


def test_reviewed_cells_become_training_data_at_the_trained_scale(session, small_pbc, tmp_path):
    """bmc data harvest: the cells a person labelled, padded to a training image's geometry, in a
    manifest with another data set; the trainer reads it and measures the model's own cell scale."""
    from bmc.contract import centre_square, read_image
    from bmc.train.cellscale import measure_cell_fraction
    from bmc.train.data import discover, split

    contract = CellClassifier(DEFAULT_MODEL).contract
    with Reviewer(session, "erin") as r:
        all_cells = r.cells()
        for c in all_cells[1:]:
            r.decide(c.id, c.model_label)  # confirmed, including cells the model was unsure of
        r.decide(all_cells[0].id, REJECTED)
    dest = tmp_path / "lab"
    p = bmc("data", "harvest", session, "--out", dest, "--with", small_pbc)
    assert f"{len(all_cells) - 1} reviewed cells written" in p.stdout

    rows = list(csv.DictReader(open(dest / "manifest.csv")))
    mine = [r for r in rows if not Path(r["path"]).is_absolute()]
    assert len(mine) == len(all_cells) - 1 and len(rows) == len(mine) + 65  # small_pbc: 64 images + 1 corrupt
    by_id = {c.id: c for c in all_cells}
    for row in mine:
        cell = by_id[int(row["path"].rsplit("_c", 1)[1].split(".")[0])]
        assert row["label"] == cell.model_label and row["group"].endswith(":" + cell.source)
        image = read_image(str(dest / row["path"]))
        stored = read_image(str(session / cell.crop))
        # the contract's centre crop of the training image is the stored crop, pixel for pixel
        assert np.array_equal(centre_square(image, contract.crop_fraction), stored)

    samples = discover(dest, manifest=dest / "manifest.csv")
    ours = [s for s in samples if str(dest) in s.path]
    fraction, n = measure_cell_fraction(ours, contract.crop_fraction)
    assert n >= 5 and abs(fraction - contract.cell_fraction) < 0.2 * contract.cell_fraction, (fraction, n)
    known = {s.label for s in samples if s not in ours}  # small_pbc's classes; the lab's others are too few
    parts = split([s for s in samples if s.label in known], seed=1)
    groups = Counter(s.group for s in ours if s.label in known)
    assert max(groups.values()) >= 2  # fields with several cells: the grouping is put to the test
    for field in groups:  # the cells of one field stay in one part of the split
        assert sum(any(s.group == field for s in parts[k]) for k in parts) == 1
    p = bmc("data", "harvest", tmp_path / "nowhere", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "no session.sqlite" in p.stderr


def test_self_training_harvests_the_unaided_calls_and_nothing_set_aside(session, tmp_path):
    """harvest(counted=True), the self-training bench's data: the cells the device counted unaided, as
    it called them, beside the reviewed ones as the person named them; never a cell set aside and
    not reviewed, nor a rejected one. The default harvest takes none of the device's own calls."""
    from bmc.train.harvest import harvest

    with Reviewer(session, "erin") as r:
        cells = r.cells()
        counted = [c for c in cells if c.status == "counted"]
        pending = [c for c in cells if c.status == "pending"]
        assert counted and len(pending) >= 2, [c.status for c in cells]
        renamed = next(lab for lab in ("lymphocyte", "monocyte") if lab != pending[0].model_label)
        r.decide(pending[0].id, renamed)
        r.decide(pending[1].id, REJECTED)
    s = harvest([session], tmp_path / "self", counted=True)
    rows = {int(row["path"].rsplit("_c", 1)[1].split(".")[0]): row["label"] for row in _manifest(tmp_path / "self")}
    assert rows == {pending[0].id: renamed} | {c.id: c.model_label for c in counted}
    assert s["sessions"][0]["counted_cells"] == len(counted) and s["sessions"][0]["reviewed_cells"] == 1
    assert s["reviewers"] == {"erin": 1, "(the device, unaided)": len(counted)}
    plain = harvest([session], tmp_path / "plain")
    assert [row["label"] for row in _manifest(tmp_path / "plain")] == [renamed]
    assert plain["sessions"][0]["counted_cells"] == 0


def test_a_spreadsheets_decisions_file_is_read(session):
    """What a spreadsheet saves in a comma-decimal locale: a UTF-8 byte-order mark and ';' separators."""
    first, second = (r["id"] for r in _csv(session)[:2])
    sheet = session / "from_excel.csv"
    sheet.write_bytes(f"\ufeffid;label;model_label\r\n{first};Neutrophil;ig\r\n{second};;ig\r\n".encode("utf-8"))
    p = bmc("edge", "review", session, "--apply", sheet, "--by", "anna")
    assert "1 decisions recorded" in p.stdout
    assert _reviews(session) == [(int(first), "neutrophil", "anna")]


def test_listing_opens_the_database_read_only(session):
    """--list writes nothing, not even the review table a first decision creates in a folder recorded
    before review existed: the database file stays byte for byte as it was."""
    db = session / "session.sqlite"
    old = sqlite3.connect(db)  # as a folder recorded before review and comments existed
    old.executescript("DROP TABLE review; DROP TABLE note; PRAGMA wal_checkpoint(TRUNCATE);")
    old.close()
    before = db.read_bytes()
    p = bmc("edge", "review", session, "--list")
    assert p.stdout.splitlines()[0].startswith("id,label,model_label")
    assert db.read_bytes() == before
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("SELECT 1 FROM sqlite_master WHERE name = 'review'").fetchone() is None
    con.close()


def test_a_recorded_session_reports_byte_for_byte_as_before(tmp_path):
    """The session database read through the session-data layer gives the report, cells.csv and
    differential.csv that the version before it wrote (tests/fixtures/recorded_session)."""
    import shutil

    from bmc.edge_app.report import write_session_files

    fixture = ROOT / "tests" / "fixtures" / "recorded_session"
    folder = tmp_path / "session"
    folder.mkdir()
    shutil.copy2(fixture / "session.sqlite", folder / "session.sqlite")
    write_session_files(folder, report=True)
    for name in ("cells.csv", "differential.csv"):
        assert (folder / name).read_bytes() == (fixture / name).read_bytes(), name
    then = (fixture / "report.html").read_text(encoding="utf-8").replace("/tmp/golden2/session", str(folder))
    for was, now in CHANGED_SINCE_GOLDEN:  # the report's intended changes since, each named
        assert was in then
        then = then.replace(was, now)
    assert (folder / "report.html").read_text(encoding="utf-8") == then


#: (text the golden report has, what the report says instead), each change meant
CHANGED_SINCE_GOLDEN = [
    ("<p>Platelets met:", "<p>Platelets seen:"),  # the word a technician uses
    ("<p>Nucleated red cells (erythroblast)", "<p>NRBC, nucleated red cells (erythroblast)"),  # one name everywhere
    # why a cell waits in words (the recorded flag on hover), and a field by its file: no frame number
    (
        "<br>unknown: unlike any known cell (distance 0.146 &gt; 0.124)<br>BloodImage_00010.jpg #3",
        "<br><span title='unknown: unlike any known cell (distance 0.146 &gt; 0.124)'>unlike the cells it learnt</span>"
        "<br>BloodImage_00010.jpg",
    ),
    # times in the device's time zone, named (the record stays UTC; the tests run in UTC)
    ("(anna, 2026-12-02T13:48)", "(anna, 2026-12-02 13:48 UTC)"),
    ("<td>2026-12-02T13:48:20.117+00:00</td>", "<td>2026-12-02 13:48:20 UTC</td>"),
    ("<td>2026-12-02T13:48:20.507+00:00</td>", "<td>2026-12-02 13:48:20 UTC</td>"),
    # the count against its target goes below the first paragraph (this session had none: an empty line)
    ("until a person names them.</p>\n<table", "until a person names them.</p>\n\n<table"),
    # one cell waits: singular; the sessions table wraps its long paths (it was wider than the window)
    ("<b class='warn'>1</b> cells wait for review", "<b class='warn'>1</b> cell waits for review"),
    (
        "</code>) and are not counted yet; <b class='warn'>1</b> of them are unlike",
        "</code>) and is not counted yet; <b class='warn'>1</b> of them is unlike",
    ),
    ("they are counted in no class until a person names them", "it is counted in no class until a person names it"),
    ("(1 cells named by a reviewer)", "(1 cell named by a reviewer)"),
    ("line-height:1.2}\n", "line-height:1.2} table.sessions td{overflow-wrap:anywhere;max-width:22em}\n"),
    ("<h2>Sessions</h2><table><tr>", '<h2>Sessions</h2>\n<table class="sessions">\n<tr>'),
]


def test_a_damaged_or_foreign_session_database_is_named_in_one_line_and_left_as_it_is(tmp_path, bccd):
    """A session.sqlite that is garbage, empty, or another program's: report, FHIR, review and adapt
    each say which file and what is wrong with it, exit 2, and write nothing into the folder."""
    import sqlite3

    fields = _bccd_fields(bccd, tmp_path / "fields", 2)
    cases = {"garbage": b"not a database at all\n", "empty": b""}
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "session.sqlite").write_bytes(data)
    (tmp_path / "foreign").mkdir()
    sqlite3.connect(tmp_path / "foreign" / "session.sqlite").execute("CREATE TABLE x (a)").connection.close()
    for name, why in (("garbage", "unreadable session database"), ("empty", "not a bmc session database"),
                      ("foreign", "not a bmc session database")):  # fmt: skip
        folder = tmp_path / name
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        for args in (("report", folder), ("report", folder, "--fhir"), ("review", folder, "--list"),
                     ("adapt", folder, "--out", tmp_path / "m")):  # fmt: skip
            p = bmc("edge", *args, check=False)
            assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr)
            line = p.stderr.strip().splitlines()[-1]
            assert line.startswith(f"error: {folder / 'session.sqlite'}: {why}"), line
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        if name == "empty":
            continue  # an empty file is no session yet: a recording may start in it (but see below)
        # recording into it: the same line, and the database is not written into (no crops either);
        # only the folder's lock file is new
        p = bmc("edge", "run", fields, "--out", folder, "--headless", check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: {folder / 'session.sqlite'}: "), p.stderr
        after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "session.lock"}
        assert after == before


def test_a_folder_whose_database_is_lost_is_not_recorded_over(tmp_path, bccd):
    """A session's files with its database emptied or deleted: recording there would overwrite the
    last record of that count (cells.csv, the report, the crops). Refused in one line, nothing written;
    an empty database in an empty folder still starts a session."""
    fields = _bccd_fields(bccd, tmp_path / "fields", 2)
    done = tmp_path / "done"
    bmc("edge", "run", fields, "--out", done, "--headless")
    for how in ("empty", "missing"):
        folder = tmp_path / how
        shutil.copytree(done, folder)
        (folder / "session.lock").unlink(missing_ok=True)
        if how == "empty":
            (folder / "session.sqlite").write_bytes(b"")
        else:
            (folder / "session.sqlite").unlink()
        for extra in ("session.sqlite-wal", "session.sqlite-shm"):
            (folder / extra).unlink(missing_ok=True)
        before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        p = bmc("edge", "run", fields, "--out", folder, "--headless", check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {folder / 'session.sqlite'}: {how}, but the folder holds a session's files"), (
            line
        )
        assert "cells.csv" in line and "report.html" in line and "record into a new folder" in line
        after = {
            p.relative_to(folder): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file() and p.name not in ("session.lock", "session.sqlite")
        }
        assert after == {k: v for k, v in before.items() if str(k) != "session.sqlite"}
        assert not (folder / "session.sqlite").exists() or (folder / "session.sqlite").read_bytes() == b""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "session.sqlite").write_bytes(b"")
    bmc("edge", "run", fields, "--out", fresh, "--headless")
    assert (fresh / "cells.csv").is_file()


def test_a_torn_database_takes_no_decision_and_says_so_in_one_line(tmp_path, bccd):
    """A session.sqlite whose tables are there but whose pages are torn: ``review --cell`` writes no
    decision into it (it wrote one, then failed in a traceback), and report and FHIR say it in a line."""
    fields = _bccd_fields(bccd, tmp_path / "fields", 30)
    out = tmp_path / "s"
    bmc("edge", "run", fields, "--out", out, "--headless")
    db_path = out / "session.sqlite"
    size = db_path.stat().st_size
    assert size > 3 * 4096
    with open(db_path, "r+b") as fh:
        for offset in range(2 * 4096, size, 4096):  # every page after the schema's and the first table's
            fh.seek(offset)
            fh.write(b"\xff" * 16)
    before = db_path.read_bytes()
    p = bmc("edge", "review", out, "--cell", "1", "--label", "neutrophil", "--by", "anna", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {db_path}: damaged session database")
    assert db_path.read_bytes() == before
    for args in (("report", out), ("report", out, "--fhir")):
        p = bmc("edge", *args, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr)
        assert "damaged" in p.stderr.strip().splitlines()[-1], p.stderr


def _bccd_fields(bccd, dest, n: int):
    """A folder of the first ``n`` BCCD fields (links)."""
    dest.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:n]:
        (dest / f.name).symlink_to(f)
    return dest

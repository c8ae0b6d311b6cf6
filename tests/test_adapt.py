"""Adapting the shipped model to another microscope on the device: real BCCD fields, the shipped
int8 model and its guard set, real sessions and review decisions, the real CLI in subprocesses."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bmc.card import ModelCardError, card_path, sha256_file
from bmc.edge_app.classifier import DEFAULT_MODEL, MODELS_DIR, CellClassifier

from conftest import ROOT, bmc, recorded_session, serving

PER_CLASS = 12  # BCCD fields of each white-cell type in the fixture session


@pytest.fixture(scope="module")
def truth(bccd) -> dict[str, str]:
    from bmc.benchmarks.bccd import single_cell_fields

    by_class: dict[str, list] = {}
    for f in single_cell_fields(bccd):
        by_class.setdefault(f.labels[0], []).append(f)
    return {f.image.name: f.labels[0] for fs in by_class.values() for f in fs[:PER_CLASS]}


@pytest.fixture(scope="module")
def recorded(bccd, truth, tmp_path_factory) -> Path:
    """A session of 48 BCCD fields (12 per white-cell type) recorded with the shipped model."""
    return recorded_session([bccd / "JPEGImages" / name for name in truth], tmp_path_factory, "adapt")


@pytest.fixture
def session(recorded, tmp_path) -> Path:
    out = tmp_path / "s"
    shutil.copytree(recorded, out)
    return out


def _answers(out: Path) -> dict[str, tuple[int, str]]:
    """Each field's scored cell (its most confident white cell): {field: (cell id, model label)}."""
    from bmc.benchmarks.adapt import field_answers

    return {f: (cid, label) for f, (label, cid) in field_answers(out / "session.sqlite").items()}


def _decide(out: Path, truth, per_class: int, label_of=None) -> Path:
    """A decisions file naming the true class of ``per_class`` fields' scored cells of each type."""
    answers = _answers(out)
    picked = Counter()
    rows = []
    for field, (cid, model_label) in sorted(answers.items()):
        t = truth[field]
        if picked[t] < per_class:
            picked[t] += 1
            rows.append((cid, label_of(t, model_label) if label_of else t))
    path = out / "decisions.csv"
    path.write_text("id,label\n" + "".join(f"{c},{l}\n" for c, l in rows))
    return path


def test_every_cell_is_recorded_with_its_embedding(recorded):
    db = sqlite3.connect(recorded / "session.sqlite")
    rows = db.execute("SELECT embedding FROM cell").fetchall()
    assert rows and all(r[0] is not None and len(r[0]) == 1280 * 2 for r in rows)


def test_shipped_model_gives_the_embedding_and_unchanged_scores():
    """The embedding is a second output of the same graph; the numpy head of the card's guard file
    reproduces the model's own class scores from it."""
    from bmc.edge_app.adapt import load_guard
    from bmc.edge_app.head import softmax

    clf = CellClassifier(DEFAULT_MODEL, orientations=1)
    assert clf.has_embedding and clf.backend.output_sizes == (8, 1280)
    guard = load_guard(clf.path, clf.card)
    assert guard["x"].shape == (1600, 1280) and Counter(guard["y"].tolist()) == {k: 200 for k in range(8)}
    x = np.random.default_rng(0).uniform(0, 255, (4, 224, 224, 3)).astype(np.float32)
    probs, emb = clf.predict_cells(x)
    assert np.abs(softmax(emb @ guard["w"] + guard["b"]) - probs).max() < 0.02  # int8 rounding of the scores
    # the guard set's cells are the model's training cells: its own head names them
    assert (np.argmax(guard["x"] @ guard["w"] + guard["b"], axis=1) == guard["y"]).mean() > 0.97


def test_adapt_writes_a_new_model_that_counts_and_names_itself(session, truth, tmp_path):
    shipped = {f.name: sha256_file(f) for f in MODELS_DIR.iterdir() if f.is_file()}
    bmc("edge", "review", session, "--apply", _decide(session, truth, 6), "--by", "anna")
    out = tmp_path / "models"
    p = bmc("edge", "adapt", session, "--out", out, "--name", "lab1", "--json", tmp_path / "adapt.json")
    assert p.stdout.strip().splitlines()[-1] == str(out / "lab1.tflite")  # the model's path, last
    assert "24 reviewed cells from 1 session folder(s) by anna" in p.stdout
    for l in ("eosinophil", "lymphocyte", "monocyte", "neutrophil", "balanced", "guard set"):
        assert l in p.stdout
    card = json.loads((out / "lab1.json").read_text())
    assert card["base_model"]["sha256"] == sha256_file(DEFAULT_MODEL)
    assert card["head"]["sha256"] == sha256_file(out / "lab1.head.npz")
    a = card["adaptation"]
    assert a["cells_per_class"] == {"eosinophil": 6, "lymphocyte": 6, "monocyte": 6, "neutrophil": 6}
    assert a["reviewers"] == ["anna"] and a["sessions"] == [str(session)] and a["date"]
    cv = a["cross_validation"]
    assert cv["adapted"]["balanced_accuracy"] >= cv["shipped"]["balanced_accuracy"]
    said = json.loads((tmp_path / "adapt.json").read_text())
    assert said["accepted"] and said["written"] == "adapted" and not said["head_kept"]
    assert said["model"] == str(out / "lab1.tflite")
    assert cv["adapted"]["log_loss"] <= cv["shipped"]["log_loss"]
    assert a["guard_check"]["drop_points"] <= 3.0
    # the reviewed cells become known ground for the unknown-cell check; its calibration carries over
    assert card["unknown"] == json.loads(card_path(DEFAULT_MODEL).read_text())["unknown"]
    adapted, base = CellClassifier(out / "lab1.tflite", threads=1), CellClassifier(DEFAULT_MODEL, threads=1)
    assert len(adapted.unknown.reference) == len(base.unknown.reference) + 24
    # the shipped files are untouched
    assert {f.name: sha256_file(f) for f in MODELS_DIR.iterdir() if f.is_file()} == shipped

    # the adapted model counts, and every record names it
    run = tmp_path / "after"
    bmc(
        "edge",
        "run",
        _fields_of(session),
        "--out",
        run,
        "--headless",
        "--model",
        out / "lab1.tflite",
        "--max-frames",
        "5",
    )
    db = sqlite3.connect(run / "session.sqlite")
    model_file, config = db.execute("SELECT model_file, config FROM session").fetchone()
    db.close()
    assert model_file == "lab1.tflite" and json.loads(config)["head"]["sha256"] == card["head"]["sha256"]
    rows = list(csv.DictReader(open(run / "cells.csv")))
    assert rows and {r["model"] for r in rows} == {"lab1.tflite + lab1.head.npz"}
    bmc("edge", "report", run)
    assert "head adapted at this laboratory" in (run / "report.html").read_text()
    doctor = bmc("edge", "doctor", "--model", out / "lab1.tflite", check=False)
    assert "lab1.head.npz" in doctor.stdout


def _fields_of(session: Path) -> Path:
    db = sqlite3.connect(session / "session.sqlite")
    source = db.execute("SELECT source FROM session").fetchone()[0]
    db.close()
    return Path(source)


def test_adapt_refuses_a_head_that_is_not_better(session, truth, tmp_path):
    """Reviewers who agree with every call of the model teach it nothing: the adapted head cannot
    beat the shipped one on those cells, so nothing is written."""
    bmc("edge", "review", session, "--apply", _decide(session, truth, 6, label_of=lambda t, m: m))
    p = bmc("edge", "adapt", session, "--out", tmp_path / "models", check=False)
    assert p.returncode == 2 and "adapted model refused, nothing written" in p.stderr
    assert "not surely better than the shipped one" in p.stderr
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def _agree_with_every_call(session: Path, truth, tmp_path: Path) -> None:
    """Reviewers who agree with the model on 6 fields per class (the head learns nothing: refused)
    and on the first 40 cells of the random calibration order (a sample that sets the gates)."""
    bmc("edge", "review", session, "--apply", _decide(session, truth, 6, label_of=lambda t, m: m))
    listed = bmc("edge", "review", session, "--list", "--for-calibration", "40").stdout
    sample = list(csv.DictReader(listed.splitlines()))
    assert len(sample) >= 20  # those of the first 40 the teaching review left undecided
    agree = tmp_path / "agree.csv"
    agree.write_text("id,label\n" + "".join(f"{r['id']},{r['model_label']}\n" for r in sample))
    bmc("edge", "review", session, "--apply", agree, "--by", "ben")


def test_a_refused_head_still_leaves_the_laboratorys_gates_on_the_shipped_head(session, truth, tmp_path):
    """The head is refused, but the laboratory reviewed cells in their random order too: those cells
    still set the gates. The shipped head is kept, unchanged, with the reviewed cells as known
    ground and the confidence rule and error statement the random sample gives (the shipped head
    learnt from none of them); the card says the adapted head was refused and why."""
    _agree_with_every_call(session, truth, tmp_path)
    p = bmc("edge", "adapt", session, "--out", tmp_path / "models", "--name", "gates", "--json", tmp_path / "a.json")
    said = json.loads((tmp_path / "a.json").read_text())
    assert not said["accepted"] and said["head_kept"] and said["written"] == "shipped-head-lab-gates"
    assert said["model"] == str(tmp_path / "models" / "gates.tflite")
    assert "adapted head refused" in p.stdout and "not surely better than the shipped one" in p.stdout
    assert "The shipped head is kept unchanged" in p.stdout and "randomly chosen" in p.stdout
    card = json.loads((tmp_path / "models" / "gates.json").read_text())
    assert card["variant"].endswith("+lab-gates") and card["adaptation"]["head_kept"]["why"]
    assert card["calibration"]["cells"] >= 20 and card["calibration"]["passed"] > 0
    assert (tmp_path / "models" / "gates.tflite").read_bytes() == Path(DEFAULT_MODEL).read_bytes()
    shipped = CellClassifier(DEFAULT_MODEL)
    kept = CellClassifier(tmp_path / "models" / "gates.tflite")
    from bmc.edge_app.adapt import load_guard

    g = load_guard(DEFAULT_MODEL, shipped.card)
    assert np.allclose(kept.head.w, g["w"]) and np.allclose(kept.head.b, g["b"])  # the shipped head, unchanged
    assert len(kept.head.reference) == card["adaptation"]["reference"]["reviewed"] > 0
    assert kept.labels == shipped.labels
    # counting with it, the report states the error of the unaided cells
    out = tmp_path / "next"
    fields = tmp_path / "f"
    fields.mkdir()
    for name in sorted(truth)[:8]:
        (fields / name).symlink_to(ROOT.parent / "shared" / "data" / "bccd" / "JPEGImages" / name)
    bmc("edge", "run", fields, "--out", out, "--headless", "--model", tmp_path / "models" / "gates.tflite")
    assert card["calibration"]["statement"] in (out / "report.html").read_text()


def test_a_kept_shipped_head_knows_only_the_reviewed_cells_it_names_itself(session, truth, tmp_path):
    """The kept head learnt nothing from the laboratory's cells: a reviewed cell it calls wrongly, or
    of a class it cannot name (a blast a person named), is no known ground for its unknown-cell check,
    and its confidence rule is never looser than the device's own. Real session, real embeddings; the
    refusal itself forced (the head would be accepted on these labels)."""
    import dataclasses

    from bmc.edge_app import adapt
    from bmc.edge_app.differential import ReviewPolicy
    from bmc.edge_app.head import softmax

    _agree_with_every_call(session, truth, tmp_path)
    clf = CellClassifier(DEFAULT_MODEL, orientations=1)
    guard = adapt.load_guard(DEFAULT_MODEL, clf.card)
    reviewed = adapt.collect([session], clf)
    called = [guard["labels"][i] for i in softmax(reviewed.x @ guard["w"] + guard["b"]).argmax(axis=1)]
    labels = list(reviewed.labels)
    named_blast = [0, 1, 2]  # three cells named as a class the model does not know
    misnamed = [3, 4]  # two cells named as another class than the shipped head's call
    for i in named_blast:
        labels[i] = "blast"
    for i in misnamed:
        labels[i] = next(l for l in guard["labels"] if l != called[i] and l != "platelet")
    reviewed = dataclasses.replace(reviewed, labels=labels)
    result = dataclasses.replace(adapt.adapt(reviewed, guard), accepted=False, reasons=["refused (forced)"])
    kept = adapt.keep_shipped_head(result, reviewed, guard, clf)
    assert kept is not None and kept.labels == list(guard["labels"]) and "blast" not in kept.labels
    known = kept.named(reviewed)
    assert not known[named_blast + misnamed].any()
    assert known.sum() == sum(l == c for l, c in zip(labels, called)) == len(kept.reference(reviewed))
    assert kept.calibration is not None and kept.calibration.min_confidence >= ReviewPolicy().min_confidence


def test_the_screen_keeps_the_shipped_head_with_the_laboratorys_gates_when_the_head_is_refused(
    session, truth, tmp_path
):
    import http.client
    import re

    from bmc.edge_app.active import models_dir
    from bmc.edge_app.ui.app import UiApp

    storage = tmp_path / "bmc" / "sessions"
    storage.mkdir(parents=True)
    shutil.move(str(session), storage / "s1")
    _agree_with_every_call(storage / "s1", truth, tmp_path)
    with serving(UiApp(storage, None, sign_in=False, user="anna")) as port:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/adapt", headers={"Host": "127.0.0.1"})
        r = c.getresponse()
        cookie = r.getheader("Set-Cookie").split(";")[0]
        csrf = re.search(r"name='csrf' value='([^']+)'", r.read().decode()).group(1)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(
            "POST",
            "/adapt",
            body=f"csrf={csrf}&session=s1&name=gates",
            headers={"Host": "127.0.0.1", "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
        )
        r = c.getresponse()
        r.read()
        assert r.status == 303 and r.getheader("Location") == "/adapt?written=gates"
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/adapt?written=gates", headers={"Host": "127.0.0.1", "Cookie": cookie})
        page = c.getresponse().read().decode()
    assert "The adapted head was refused" in page and "<b>gates</b> written instead" in page
    assert "Gates set on" in page and "randomly chosen" in page
    card = json.loads((models_dir(storage) / "gates.json").read_text())
    assert card["variant"].endswith("+lab-gates")


def test_a_class_the_model_does_not_know_is_learnt_and_marked(session, truth, tmp_path):
    """A laboratory names some monocytes 'blast' (as if they were): the head gains the class."""
    bmc(
        "edge",
        "review",
        session,
        "--apply",
        _decide(session, truth, 6, label_of=lambda t, m: "blast" if t == "monocyte" else t),
        "--new-label",
    )
    out = tmp_path / "models"
    bmc("edge", "adapt", session, "--out", out, "--name", "withblast")
    card = json.loads((out / "withblast.json").read_text())
    assert card["contract"]["labels"][-1] == "blast" and card["head"]["new_labels"]["blast"]["cells"] == 6
    clf = CellClassifier(out / "withblast.tflite")
    assert clf.labels[-1] == "blast" and clf.base_labels == CellClassifier(DEFAULT_MODEL).labels


@pytest.mark.parametrize("case", ["none", "one-blast", "one-class", "other-model", "corrupt", "no-embedding"])
def test_bad_input_is_one_clear_line_and_writes_nothing(session, truth, tmp_path, case):
    out = tmp_path / "models"
    expect = {
        "none": "no reviewed cells",
        "one-blast": "too few reviewed cells to learn 'blast' (1 cell)",
        "one-class": "are 'neutrophil'",
        "other-model": "not with bmc_pbc8_lite0_int8.tflite",
        "corrupt": "session.sqlite: unreadable session database (file is not a database)",
        "no-embedding": "has no recorded embedding and its crop",
    }
    first = _answers(session)
    ids = sorted(cid for cid, _ in first.values())
    if case == "one-blast":
        (session / "d.csv").write_text(f"id,label\n{ids[0]},blast\n{ids[1]},neutrophil\n{ids[2]},eosinophil\n")
        bmc("edge", "review", session, "--apply", session / "d.csv", "--new-label")
    elif case == "one-class":
        (session / "d.csv").write_text("id,label\n" + "".join(f"{i},neutrophil\n" for i in ids[:5]))
        bmc("edge", "review", session, "--apply", session / "d.csv")
    elif case == "other-model":
        db = sqlite3.connect(session / "session.sqlite")
        db.execute("UPDATE session SET model_file = 'other.tflite', model_sha256 = ?", ("ab" * 32,))
        db.commit()
        db.close()
    elif case == "corrupt":
        (session / "session.sqlite").write_bytes(b"this is not a database" * 100)
        for f in session.glob("session.sqlite-*"):
            f.unlink()
    elif case == "no-embedding":
        bmc("edge", "review", session, "--apply", _decide(session, truth, 3))
        db = sqlite3.connect(session / "session.sqlite")
        db.execute("UPDATE cell SET embedding = NULL")
        db.commit()
        db.close()
        for f in (session / "crops").iterdir():
            f.unlink()
    p = bmc("edge", "adapt", session, "--out", out, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert expect[case] in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() or not list(out.iterdir())


def test_embeddings_are_recomputed_from_crops_for_older_sessions(session, truth, tmp_path):
    """A session recorded before embeddings were stored adapts from its cells' crops."""
    bmc("edge", "review", session, "--apply", _decide(session, truth, 6))
    db = sqlite3.connect(session / "session.sqlite")
    db.execute("UPDATE cell SET embedding = NULL")
    db.commit()
    db.close()
    from bmc.edge_app import adapt

    clf = CellClassifier(DEFAULT_MODEL, orientations=4)
    reviewed = adapt.collect([session], clf)
    assert reviewed.x.shape == (24, 1280) and Counter(reviewed.labels) == {l: 6 for l in set(truth.values())}


def test_adapting_imports_no_training_stack(session, truth):
    """On the device: numpy only (no TensorFlow, no scikit-learn), in seconds."""
    bmc("edge", "review", session, "--apply", _decide(session, truth, 6))
    code = (
        "import sys, time; t = time.perf_counter(); from bmc.cli import main\n"
        "try:\n    main(['edge', 'adapt', sys.argv[1], '--out', sys.argv[2]])\nexcept SystemExit:\n    pass\n"
        "print('seconds', time.perf_counter() - t)\n"
        "print('heavy', sorted(m for m in ('tensorflow', 'sklearn', 'keras', 'scipy') if m in sys.modules))"
    )
    import subprocess

    p = subprocess.run(
        [sys.executable, "-c", code, str(session), str(session.parent / "m")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert "heavy []" in p.stdout, p.stdout + p.stderr
    assert (session.parent / "m").is_dir()


def test_review_for_adaptation_spreads_classes_least_sure_first(recorded):
    from bmc.edge_app import review, sessiondb

    db = sessiondb.connect(recorded)
    cells = sessiondb.cells(db)
    db.close()
    q = review.teaching_queue(cells, per_class=3)
    found = sorted({c.model_label for c in cells})
    first = [c.model_label for c in q[: len(found)]]
    assert sorted(first) == found  # the first round covers every class the session found
    for label in found:
        mine = [c for c in q if c.model_label == label]
        assert len(mine) <= 3
        margins = [review._margin(c.probabilities) for c in mine]
        assert margins == sorted(margins)
    p = bmc("edge", "review", recorded, "--list", "--for-adapt", "--per-class", "2")
    assert len(p.stdout.strip().splitlines()) - 1 == sum(min(2, sum(c.model_label == l for c in cells)) for l in found)


@pytest.mark.parametrize("labels", [3, 10])
def test_a_model_whose_card_names_other_labels_is_refused(tmp_path, fields_dir, labels):
    """A card with 3 or 10 labels beside an 8-class model: refused on load by run, evaluate and doctor."""
    model = tmp_path / "m.tflite"
    shutil.copyfile(DEFAULT_MODEL, model)
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    card["contract"]["labels"] = [f"class{i}" for i in range(labels)]
    card.pop("guard", None)
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=f"gives 8 class scores per cell but its card names {labels} labels"):
        CellClassifier(model)
    for args in (
        ["edge", "run", fields_dir, "--out", tmp_path / "s", "--headless", "--model", model],
        ["evaluate", model, fields_dir.parent / "classes"],
    ):
        p = bmc(*args, check=False)
        assert p.returncode == 2 and f"card names {labels} labels" in p.stderr, p.stderr
    p = bmc("edge", "doctor", "--model", model, check=False)
    assert p.returncode == 1 and f"card names {labels} labels" in p.stdout


@pytest.fixture
def fields_dir(bccd, pbc, tmp_path) -> Path:
    d = tmp_path / "fields"
    d.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:2]:
        (d / f.name).symlink_to(f)
    (tmp_path / "classes" / "neutrophil").mkdir(parents=True)
    for f in sorted((pbc / "neutrophil").glob("*.jpg"))[:2]:
        (tmp_path / "classes" / "neutrophil" / f.name).symlink_to(f)
    return d


def test_adapting_from_the_screen_and_making_the_model_active(session, truth, tmp_path):
    """The screen's adaptation page runs the same adapt, writes the model beside the storage folder,
    and makes it active; the service counts with it from its next session, and goes back."""
    import http.client
    import re

    from bmc.edge_app import config as config_mod
    from bmc.edge_app.active import active_model, models_dir
    from bmc.edge_app.service import serve
    from bmc.edge_app.ui.app import UiApp

    storage = tmp_path / "bmc" / "sessions"
    storage.mkdir(parents=True)
    shutil.move(str(session), storage / "s1")
    bmc("edge", "review", storage / "s1", "--apply", _decide(storage / "s1", truth, 6), "--by", "anna")

    def call(method, path, body=""):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(
            method,
            path,
            body=body,
            headers={"Host": "127.0.0.1", "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
        )
        r = c.getresponse()
        return r.status, r.read().decode()

    with serving(UiApp(storage, None, sign_in=False, user="anna")) as port:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/adapt", headers={"Host": "127.0.0.1"})
        r = c.getresponse()
        cookie = r.getheader("Set-Cookie").split(";")[0]
        page = r.read().decode()
        csrf = re.search(r"name='csrf' value='([^']+)'", page).group(1)
        assert "value='s1' checked" in page
        status, page = call("POST", "/adapt", f"csrf={csrf}&session=s1&name=lab1")
        assert status == 303  # the form's answer is a page of its own: a reload shows it, adapting nothing
        status, page = call("GET", "/adapt?written=lab1")
        assert status == 200 and "<b>lab1</b> written" in page and "balanced accuracy" in page
        assert "Gates set on" in page or "No random calibration sample" in page  # what it will count alone
        assert (models_dir(storage) / "lab1.tflite").is_file()
        status, _ = call("POST", "/adapt/activate", f"csrf={csrf}&model=..%2F..%2Fetc%2Fpasswd")
        assert status == 400 and active_model(storage) is None
        status, _ = call("POST", "/adapt/activate", f"csrf={csrf}&model=lab1.tflite")
        assert status == 303 and active_model(storage) == (models_dir(storage) / "lab1.tflite").resolve()
        status, page = call("GET", "/device", "")
        assert status == 200 and "active model: lab1.tflite" in page and "lab1.head.npz" in page  # what counts now

    fields = tmp_path / "fields"
    fields.mkdir()
    for name in sorted(truth)[:2]:
        (fields / name).symlink_to(_fields_of(storage / "s1") / name)
    cfg_file = tmp_path / "bmc.toml"
    cfg_file.write_text(f"[camera]\nsource = '{fields}'\n[storage]\nfolder = '{storage}'\n")
    lines = []
    serve(config_mod.load(cfg_file), echo=lines.append, max_sessions=1)
    assert any(l.startswith("counting with lab1.tflite") and "lab1.head.npz" in l for l in lines)
    newest = sorted(d for d in storage.iterdir() if d.name != "s1")[-1]
    db = sqlite3.connect(newest / "session.sqlite")
    assert db.execute("SELECT model_file FROM session").fetchone()[0] == "lab1.tflite"
    db.close()
    from bmc.edge_app.active import set_active

    set_active(storage, None, "anna")  # back to the shipped model
    lines = []
    serve(config_mod.load(cfg_file), echo=lines.append, max_sessions=1)
    assert any(l.startswith("counting with bmc_pbc8_lite0_int8.tflite") for l in lines)


def test_bench_adapt_plays_the_protocol_and_measures_its_ceiling(matek, tmp_path):
    """``bmc bench adapt`` on the Munich cells (cell mode): K labelled per class, a real adapt and
    rerun, the unlabelled cells scored; ``--ceiling`` labels every cell and reports the refit head's
    cross-validation, the most the protocol could reach with this embedding."""
    truth = tmp_path / "truth.csv"
    bmc("bench", "truth", matek, "--format", "matek", "--out", truth)
    rows = list(csv.DictReader(open(truth)))
    per_class = Counter(r["label"] for r in rows)
    protocol = ("bench", "adapt", "--source", matek, "--truth", truth, "--mode", "cell", "--orientations", "1")
    bmc(*protocol, "--k", "2", "--seeds", "1", "--json", tmp_path / "run.json")
    r = json.loads((tmp_path / "run.json").read_text())["runs"][0]
    assert r["labelled"] == sum(min(2, n) for n in per_class.values())
    assert r["before"]["fields"] == len(rows) - r["labelled"]  # only cells nobody labelled are scored
    if not r["accepted"]:  # refused: the laboratory keeps the shipped model, and its figures
        assert r["after"] == r["before"] and r["reasons"]
    p = bmc(*protocol, "--ceiling", "--json", tmp_path / "ceiling.json")
    c = json.loads((tmp_path / "ceiling.json").read_text())
    assert c["labelled"] == c["fields"] == len(rows)
    assert 0 <= c["adapted"]["balanced_accuracy"] <= 1 and set(c["adapted"]["recall"]) <= set(per_class)
    assert f"refit head {c['adapted']['balanced_accuracy']:.3f}" in p.stdout


def test_a_session_given_twice_or_copied_is_refused_not_counted_twice(session, tmp_path):
    """The same session twice (by its path, or as a copy of its folder) would count each reviewed cell
    twice, and the random sample twice in the error rate stated from it: adapt refuses, saying which."""
    p = bmc("edge", "adapt", session, session, "--out", tmp_path / "m", "--name", "twice", check=False)
    assert p.returncode == 2 and f"{session}: given twice" in p.stderr
    copy = tmp_path / "copy"
    shutil.copytree(session, copy)
    p = bmc("edge", "adapt", session, copy, "--out", tmp_path / "m", "--name", "copied", check=False)
    assert p.returncode == 2 and "hold the same session" in p.stderr and "one is a copy" in p.stderr
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())

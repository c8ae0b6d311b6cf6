"""Gates calibrated at the laboratory's microscope (``bmc.edge_app.calibration``): a random sample of
reviewed cells sets the unknown-cell threshold and the confidence rule, and the report, the screen
and FHIR state how accurate the cells counted with no person are, with the cells it rests on."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle

from bmc.benchmarks.bccd import single_cell_fields
from bmc.edge_app.calibration import (
    MIN_CELLS,
    LabCalibration,
    calibrate,
    calibration_order,
    conformal_quantile,
    decided_prefix,
)

from conftest import PBC_ONLY_MODEL, bmc, recorded_session


def test_the_calibration_order_is_a_fixed_permutation_and_the_sample_its_decided_prefix():
    ids = list(range(1, 41))
    a, b = calibration_order(ids, "s|1|2026-12-02T09:00"), calibration_order(ids, "s|1|2026-12-02T09:00")
    assert a == b and sorted(a) == ids and a != ids
    assert calibration_order(ids, "s|1|2026-12-02T10:00") != a
    # a person decided the first five and the eighth: the sample ends where a cell was skipped
    assert decided_prefix(a, set(a[:5]) | {a[7]}) == a[:5]


def test_the_conformal_quantile_keeps_the_level_on_new_cells():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(400):
        cal, new = rng.gamma(2.0, 1.0, 60), rng.gamma(2.0, 1.0)
        hits.append(new <= conformal_quantile(cal, 0.9))
    assert np.mean(hits) >= 0.88  # ≥ level, up to the simulation's own noise


def test_the_confidence_rule_is_the_lowest_that_keeps_the_error_rate():
    rng = np.random.default_rng(1)
    n = 80
    top = np.sort(rng.uniform(0.4, 1.0, n))[::-1]
    probs = np.stack([top, 1 - top], axis=1)
    truth = [0] * n
    for i in (30, 45, 50, 60, 70, 75):  # wrong calls, all below the 30 surest
        truth[i] = 1
    truth[79] = None  # a rejected cell (not a cell): wrong whenever it is counted
    c = calibrate(probs, truth, None, None, target_error=0.05)
    passed = top >= c.min_confidence
    errors = sum(1 for i in np.flatnonzero(passed) if truth[i] != 0)
    assert errors / passed.sum() <= 0.05
    # the statement judges each cell by the rule the other cells choose: chosen without it, the
    # rule lets through the wrong call just below the threshold (cell 50), which the rule chosen on
    # every cell had stopped at; scored on the cells that chose it, it would have looked right
    assert top[50] < c.min_confidence and c.correct == passed.sum() - errors and c.passed == passed.sum() + 1
    lower = top >= c.min_confidence - 0.01
    assert sum(1 for i in np.flatnonzero(lower) if truth[i] != 0) / lower.sum() > 0.05 or lower.sum() == passed.sum()
    lo, hi = c.interval
    assert lo < c.accuracy <= hi and "randomly chosen" in c.statement()
    with pytest.raises(ValueError, match="too few"):
        calibrate(probs[: MIN_CELLS - 1], truth[: MIN_CELLS - 1], None, None)


def test_the_unknown_threshold_stays_the_cards_and_the_laboratorys_quantile_is_recorded():
    """Raised to the laboratory's own quantile, the threshold let unknown cells through (the Munich
    blasts at BCCD): it stays the card's, and cells beyond it are not counted in the estimate."""
    probs = np.tile([[0.9, 0.1]], (40, 1))
    far = np.linspace(0.05, 0.3, 40)
    c = calibrate(probs, [0] * 40, far, 0.12)
    assert c.unknown_threshold == 0.12 and c.lab_unknown_quantile == pytest.approx(conformal_quantile(far, 0.98))
    assert c.passed == int((far <= 0.12).sum())


@pytest.fixture(scope="module")
def bccd_session(bccd, tmp_path_factory):
    fields = [f.image for f in single_cell_fields(bccd)[:90]]
    return recorded_session(fields, tmp_path_factory, "calibration", PBC_ONLY_MODEL)


def _truth_of(bccd, rows):
    """The decisions a reviewer who knows BCCD's labels writes: the field's white cell (its box
    holds the cell's centre) named, any other cell rejected."""
    labels = {f.image.name: (f.labels[0], f.wbc[0]) for f in single_cell_fields(bccd)}
    out = []
    for r in rows:
        label, box = labels[r["source"]]
        x, y, w, h = (int(r[k]) for k in ("x", "y", "w", "h"))
        inside = box.x <= x + w / 2 <= box.x + box.w and box.y <= y + h / 2 <= box.y + box.h
        out.append({**r, "label": label if inside else "rejected"})
    return out


def test_adapting_with_a_random_sample_calibrates_the_gates_and_the_report_states_the_error(
    bccd, bccd_session, tmp_path
):
    import shutil

    session = tmp_path / "s"
    shutil.copytree(bccd_session, session)
    cells = {r["id"]: r for r in csv.DictReader(open(session / "cells.csv"))}
    # the cells that teach most, then 50 of the random calibration order: named from BCCD's labels
    teach = list(
        csv.DictReader(io.StringIO(bmc("edge", "review", session, "--list", "--for-adapt", "--per-class", "6").stdout))
    )
    rows = [{**cells[r["id"]], "id": r["id"]} for r in teach]
    decisions = tmp_path / "teach.csv"
    _write(decisions, _truth_of(bccd, rows))
    bmc("edge", "review", session, "--apply", decisions, "--by", "anna")
    listed = bmc("edge", "review", session, "--list", "--for-calibration", "50").stdout
    sample = [{**cells[r["id"]], "id": r["id"]} for r in csv.DictReader(io.StringIO(listed))]
    assert len(sample) == 50
    _write(decisions, _truth_of(bccd, sample))
    bmc("edge", "review", session, "--apply", decisions, "--by", "ben")
    said = bmc("edge", "adapt", session, "--out", tmp_path / "m", "--name", "lab1", "--model", PBC_ONLY_MODEL).stdout
    card = json.loads((tmp_path / "m" / "lab1.json").read_text())
    assert card["variant"].endswith("+adapted-head")  # the adapted head itself, not the shipped one kept
    cal = card["calibration"]
    assert f"counted without a person from confidence {cal['min_confidence']:.2f}" in said and cal["statement"] in said
    assert cal["cells"] >= 50 and 0.4 <= cal["min_confidence"] <= 0.99
    assert cal["unknown_threshold"] == pytest.approx(card["unknown"]["levels"][3][1])  # the card's, at 0.98
    assert "randomly chosen" in cal["statement"]
    # counting with it: the session's report, FHIR and screen carry the statement
    fields = tmp_path / "more"
    fields.mkdir()
    for f in single_cell_fields(bccd)[90:110]:
        (fields / f.image.name).symlink_to(f.image)
    out = tmp_path / "next"
    bmc("edge", "run", fields, "--out", out, "--headless", "--model", tmp_path / "m" / "lab1.tflite")
    bmc("edge", "report", out, "--fhir")
    assert "Cells counted without a person at this microscope" in (out / "report.html").read_text()
    fhir = json.loads((out / "differential.fhir.json").read_text())
    Bundle.model_validate(fhir)  # the estimate's Observation is valid FHIR R4 too
    assert "randomly chosen" in fhir["entry"][0]["resource"]["conclusion"]
    assert "with head lab1.head.npz (sha256" in fhir["entry"][0]["resource"]["conclusion"]  # not the base alone
    # and in fields a LIS reads: the estimate, its 95% interval, the reviewed cells it rests on
    stated = next(
        e["resource"] for e in fhir["entry"] if e["resource"]["code"]["text"].startswith("estimated accuracy")
    )
    lo, hi = cal["interval"]
    assert stated["valueQuantity"]["value"] == pytest.approx(100 * cal["correct"] / cal["passed"], abs=0.05)
    assert stated["component"][0]["valueQuantity"]["value"] == cal["passed"]
    assert stated["component"][0]["code"]["coding"][0]["code"] == "calibration-cells"  # not "cells counted"
    assert stated["component"][1]["valueRange"]["low"]["value"] == pytest.approx(100 * lo, abs=0.05)
    assert stated["component"][1]["valueRange"]["high"]["value"] == pytest.approx(100 * hi, abs=0.05)
    recorded = json.loads(
        __import__("sqlite3").connect(out / "session.sqlite").execute("SELECT config FROM session").fetchone()[0]
    )
    assert recorded["review"]["min_confidence"] == cal["min_confidence"]
    assert recorded["unknown"]["threshold"] == pytest.approx(cal["unknown_threshold"])


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_the_adaptation_gate_is_a_paired_bootstrap_of_the_log_loss_over_fields():
    """A head better on most cells is accepted whatever one cell's call; a head that differs only
    by chance has an interval around 0."""
    from bmc.edge_app.adapt import paired_log_loss

    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    groups = [f"field{i}" for i in range(n)]
    ship = np.full((n, 3), 0.2)
    ship[np.arange(n), y] = 0.6
    better = np.full((n, 3), 0.1)
    better[np.arange(n), y] = 0.8
    better[0] = [0.45, 0.45, 0.1]  # one cell now wrong: a balanced accuracy can drop, the log-loss not much
    w = np.ones(n)
    d = paired_log_loss(y, ship, better, w, groups)
    assert d["gain"] > 0 and d["low"] > 0 and d["fields"] == n
    noise = np.clip(ship + rng.normal(0, 0.05, ship.shape), 0.01, 1)
    noise /= noise.sum(axis=1, keepdims=True)
    d = paired_log_loss(y, ship, noise, w, groups)
    assert d["low"] < 0 < d["high"]


def test_a_benchmark_session_draws_the_same_random_sample_on_every_run(bccd, tmp_path):
    """The random calibration order is seeded by the session's start: a benchmark pins the start, so
    its figures can be rerun; two sessions recorded now, in folders of the same name, draw apart."""
    from bmc.benchmarks.adapt import BENCH_START, run_session
    from bmc.edge_app import review, sessiondb
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig

    fields = tmp_path / "fields"
    fields.mkdir()
    for f in single_cell_fields(bccd)[:12]:
        (fields / f.image.name).symlink_to(f.image)

    def order(folder):
        db = sessiondb.connect(folder)
        try:
            assert len(sessiondb.sessions(db)) == 1
            return sessiondb.sessions(db)[0].started, [c.id for c in review.calibration_queue(db, sessiondb.cells(db))]
        finally:
            db.close()

    for run in ("a", "b"):
        run_session(fields, PBC_ONLY_MODEL, tmp_path / run / "seed1", "field", 1, 2)
    (start_a, a), (start_b, b) = order(tmp_path / "a" / "seed1"), order(tmp_path / "b" / "seed1")
    assert start_a == start_b == BENCH_START and len(a) >= 12 and a == b and sorted(a) != a
    clf = CellClassifier(PBC_ONLY_MODEL, orientations=1)
    for run in ("c", "d"):
        EdgeSession(
            str(fields), clf, tmp_path / run / "seed1", SessionConfig(save_crops=False), echo=lambda m: None
        ).run()
    (start_c, c), (start_d, d) = order(tmp_path / "c" / "seed1"), order(tmp_path / "d" / "seed1")
    assert start_c != start_d and start_c != BENCH_START and c != d and sorted(c) == sorted(d)


def test_a_sample_that_meets_the_error_rate_at_no_confidence_keeps_the_devices_rule_and_says_so():
    """Errors spread over every confidence: no rule keeps 5%; the strictest would leave the device
    counting almost nothing, so its own rule stays and the statement gives the error it has."""
    rng = np.random.default_rng(2)
    n = 60
    top = np.sort(rng.uniform(0.5, 1.0, n))[::-1]
    probs = np.stack([top, 1 - top], axis=1)
    truth: list = [0] * n
    for i in range(0, n, 8):  # one cell in eight wrong, the surest among them
        truth[i] = 1
    c = calibrate(probs, truth, None, None, target_error=0.05)
    assert not c.target_met and c.min_confidence == 0.6
    assert c.passed == int((top >= 0.6).sum()) and c.correct == sum(
        1 for i in range(n) if top[i] >= 0.6 and truth[i] == 0
    )
    lo, hi = c.interval
    assert lo < c.accuracy < 0.95 and "short of the 95% aimed for" in c.statement()
    again = LabCalibration.from_dict(c.to_dict())
    assert again == c
    old = {k: v for k, v in c.to_dict().items() if k != "target_met"}  # a card written before target_met
    assert LabCalibration.from_dict(old).target_met


def test_cells_called_a_class_counted_apart_enter_neither_the_error_rate_nor_the_statement():
    """A platelet counted apart is in no percentage: the statement is of the differential's cells."""
    rng = np.random.default_rng(3)
    n = 60
    top = rng.uniform(0.7, 1.0, n)
    called = np.array([2 if i % 3 == 0 else 0 for i in range(n)])  # a third called platelet (class 2)
    probs = np.zeros((n, 3))
    probs[np.arange(n), called] = top
    probs[np.arange(n), np.where(called == 2, 0, 1)] = 1 - top
    truth: list = [int(c) for c in called]
    for i in range(1, n, 6):  # every sixth cell is wrong, none of them a platelet call
        truth[i] = 1
    every = calibrate(probs, truth, None, None, target_error=0.3)
    apart = calibrate(probs, truth, None, None, target_error=0.3, apart=(2,))
    assert every.passed == n and apart.passed == int((called != 2).sum())
    assert apart.accuracy < every.accuracy and apart.correct == sum(truth[i] == 0 for i in range(n) if called[i] != 2)


def _session_over_fields(bccd, tmp_path, n: int):
    """(the first ``n`` single-white-cell BCCD fields, the database of the shipped model's session over them)."""
    from bmc.benchmarks.adapt import run_session
    from bmc.edge_app.classifier import DEFAULT_MODEL

    fields = tmp_path / "fields"
    fields.mkdir()
    found = single_cell_fields(bccd)[:n]
    for f in found:
        (fields / f.image.name).symlink_to(f.image)
    run_session(fields, DEFAULT_MODEL, tmp_path / "s", "field", 1, 2)
    return found, tmp_path / "s" / "session.sqlite"


def test_the_bench_checks_the_statement_on_the_differential_the_screen_shows(bccd, tmp_path):
    """``bench autonomy`` measures the stated accuracy on every cell counted unaided into the
    differential, not only on the field's white cell: a lobe or a red cell counted as a leukocyte is
    an error a technician sees in the count, and the random sample's statement counts it as one."""
    from bmc.benchmarks.autonomy import cells_of, in_differential, score
    from bmc.edge_app import review, sessiondb

    found, db_path = _session_over_fields(bccd, tmp_path, 30)
    listed = in_differential(db_path)
    db = sessiondb.connect(tmp_path / "s")
    try:
        diff = review.session_differential(db)
    finally:
        db.close()
    # nobody reviewed: the differential (with the erythroblasts beside it) is exactly those cells
    assert sum(listed.values()) == diff.total + (diff.nrbc.count if diff.nrbc else 0) > 0
    truth = {f.image.name: f.labels[0] for f in found}
    classes = sorted(set(truth.values()))
    cells = cells_of(db_path)
    s = score(truth, cells, sorted(truth), classes, listed)
    assert s["differential_right"] <= s["right"] and s["differential_cells"] == sum(listed.values()) >= s["counted"]
    # a second cell counted in a field of one white cell (a lobe cut apart) is an error of the count
    one = next(f for f in sorted(truth) if listed.get(f) == 1 and cells[f][0] == truth[f])
    split = score(truth, cells, sorted(truth), classes, {**listed, one: 2})
    assert split["differential_cells"] == s["differential_cells"] + 1
    assert split["differential_right"] == s["differential_right"] and split["right"] == s["right"]


def test_a_sequence_of_sessions_goes_on_with_the_laboratorys_gates_when_its_head_is_refused(bccd, tmp_path):
    """``bench autonomy --days``: a laboratory whose reviewers agree with every call teaches the head
    nothing, so it is refused; as ``bmc edge adapt`` does, the shipped head is kept with the gates its
    random sample sets, and the later days are counted with it (the sequence used to stop there)."""
    from bmc.benchmarks.adapt import field_answers, run_session
    from bmc.benchmarks.autonomy import sequence
    from bmc.edge_app.classifier import DEFAULT_MODEL

    found = single_cell_fields(bccd)[:40]
    fields = tmp_path / "fields"
    fields.mkdir()
    for f in found:
        (fields / f.image.name).symlink_to(f.image)
    run_session(fields, DEFAULT_MODEL, tmp_path / "s", "field", 1, 2)
    calls = field_answers(tmp_path / "s" / "session.sqlite")
    truth = tmp_path / "agree.csv"  # the truth a reviewer who agrees with the model gives
    truth.write_text(
        "file,label\n"
        + "".join(f"JPEGImages/{f.image.name},{calls[f.image.name][0]}\n" for f in found if f.image.name in calls)
    )
    r = sequence(bccd, truth, k=2, seeds=(1,), days=1, calibration=24, orientations=1, threads=2, log=lambda m: None)
    (run,) = r["runs"]
    assert not run.get("refused") and run["first_day_refused"] == ["fixed", "grown"]
    # the later day was counted with the kept head, and scored, and the table says which head
    assert len(run["fixed"]) == len(run["grown"]) == 1 and run["fixed"][0]["fields"] > 0
    assert run["fixed"][0]["counted"] > 0 and run["grown"][0]["head"] == "shipped head, laboratory's gates"
    from bmc.benchmarks.autonomy import sequence_markdown

    table = sequence_markdown(r)
    assert table.count("(shipped head, laboratory's gates)") == 2  # the fixed and the grown line


def test_the_gates_ceiling_holds_the_setting_the_session_counted_with(bccd, tmp_path):
    """``bench autonomy --gates`` replays every setting of the gates on a recorded session: the
    device's own (level 0.98, confidence 0.60, margin 0.15) gives exactly what the session counted,
    so the ceiling it reports is of settings the device really has, and no higher than what they give."""
    from bmc.benchmarks.autonomy import FRONTIER_TARGETS, cells_of, frontier, gate_points, score
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.differential import ReviewPolicy
    from bmc.edge_app.unknown import DEFAULT_LEVEL

    found, db_path = _session_over_fields(bccd, tmp_path, 40)
    truth = {f.image.name: f.labels[0] for f in found}
    classes = sorted(set(truth.values()))
    names = sorted(truth)
    clf = CellClassifier(DEFAULT_MODEL, orientations=1)
    points = gate_points(truth, db_path, clf, names, classes)
    policy = ReviewPolicy()
    device = next(
        p
        for p in points
        if p["unknown_level"] == f"{DEFAULT_LEVEL:g}"
        and p["min_confidence"] == policy.min_confidence
        and p["min_margin"] == policy.min_margin
    )
    s = score(truth, cells_of(db_path), names, classes)
    assert 0 < s["counted_share"] < 1  # at BCCD the device sets some cells aside
    assert device["counted_share"] == s["counted_share"]
    assert device["balanced_accuracy_counted"] == pytest.approx(s["balanced_accuracy_counted"])
    off = [p for p in points if p["unknown_level"] == "off" and p["min_margin"] == 0]
    at_device = [p for p in points if p["unknown_level"] == device["unknown_level"] and p["min_margin"] == 0]
    assert all(a["counted_share"] >= b["counted_share"] for a, b in zip(off, at_device))  # the check off lets more by
    assert all(a["counted_share"] >= b["counted_share"] for a, b in zip(off, off[1:]))  # stricter counts fewer
    best = frontier(truth, db_path, clf, names, classes)["best_at"]
    shares = [best[f"{t:.2f}"]["counted_share"] if best[f"{t:.2f}"] else 0.0 for t in FRONTIER_TARGETS]
    assert shares == sorted(shares, reverse=True)  # a higher accuracy is bought with fewer cells
    for t in FRONTIER_TARGETS:
        reach = [p["counted_share"] for p in points if p["balanced_accuracy_counted"] >= t]
        assert (best[f"{t:.2f}"] or {}).get("counted_share", 0.0) == max(reach, default=0.0)

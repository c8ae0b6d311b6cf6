"""The differential a laboratory reads: per 100 leukocytes, platelets and erythroblasts apart, in
clinical order, and the same figure, to the decimal, on the console, in ``differential.csv``, in
``report.html``, on the screen and in the FHIR export of one real session on BCCD fields."""

from __future__ import annotations

import csv
import json
import re
import sqlite3

import pytest

from bmc.edge_app import review, sessiondb
from bmc.edge_app.differential import CLINICAL_ORDER, differential_of, display

from conftest import bmc, serving


@pytest.fixture(scope="module")
def counted(bccd, tmp_path_factory):
    """A real session of 60 BCCD fields through ``bmc edge run``, with its console output."""
    src = tmp_path_factory.mktemp("fields")
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:60]:
        (src / f.name).symlink_to(f)
    out = tmp_path_factory.mktemp("diff") / "s"
    # the unknown-cell check off: BCCD is another microscope, and most of its cells would wait for review
    p = bmc("edge", "run", src, "--out", out, "--headless", "--orientations", "1", "--unknown-level", "0")
    bmc("edge", "report", out, "--fhir")
    return out, p.stdout


def _record(out):
    db = sessiondb.connect(out)
    try:
        return review.session_differential(db)
    finally:
        db.close()


def test_the_denominator_is_the_leukocytes(counted):
    out, _ = counted
    record = _record(out)
    db = sqlite3.connect(out / "session.sqlite")
    by_label = dict(db.execute("SELECT label, COUNT(*) FROM cell WHERE flag = '' GROUP BY label").fetchall())
    db.close()
    labels = [r.label for r in record.rows]
    assert "platelet" not in labels and "erythroblast" not in labels
    assert record.platelets == by_label.get("platelet", 0)
    assert record.total == sum(k for l, k in by_label.items() if l not in ("platelet", "erythroblast"))
    assert labels == [l for l in CLINICAL_ORDER if l in labels]  # clinical order, every class listed
    assert sum(r.percent for r in record.rows) == pytest.approx(100.0)


def test_one_figure_on_the_console_the_csv_the_report_the_screen_and_fhir(counted):
    out, console = counted
    record = _record(out)
    assert record.total > 10, "the session needs leukocytes counted"
    final = next(line for line in console.splitlines() if line.startswith("session finished:"))
    report = (out / "report.html").read_text()
    rows = {r["class"]: r for r in csv.DictReader(open(out / "differential.csv"))}
    fhir = json.loads((out / "differential.fhir.json").read_text())
    obs = {
        e["resource"]["code"]["text"]: e["resource"]
        for e in fhir["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }
    page = _screen_page(out)
    assert f"{record.total} leukocytes:" in final
    for r in record.rows:
        pct = f"{r.percent:.1f}"
        if r.count:
            assert f"{display(r.label)} {r.count} ({pct}%)" in final, (r, final)
        row = f"<td>{display(r.label)}</td><td class='num'>{r.count}</td><td class='num'>{pct}%</td>"
        assert row in report and row in page, r
        assert rows[r.label]["count"] == str(r.count) and rows[r.label]["percent"] == pct
        assert f"{obs[r.label]['valueQuantity']['value']:.1f}" == pct
    assert "platelet" not in {k for k, o in obs.items() if "valueQuantity" in o}
    # where the shares as shown do not add to 100.0%, the report and the screen say so, with their sum
    shown = round(sum(round(r.percent, 1) for r in record.rows), 1)
    note = f"as shown they add to {shown:.1f}%, exactly 100% before rounding"
    assert (note in report and note in page) if shown != 100.0 else ("as shown they add" not in report + page)


def test_shares_that_round_away_from_100_say_so():
    thirds = differential_of({"neutrophil": 1, "lymphocyte": 1, "monocyte": 1})
    assert [f"{r.percent:.1f}" for r in thirds.rows if r.count] == ["33.3"] * 3
    assert "as shown they add to 99.9%" in thirds.rounding_note()
    from bmc.edge_app.report import differential_html

    assert "as shown they add to 99.9%, exactly 100% before rounding" in differential_html(thirds)
    assert differential_of({"neutrophil": 1, "lymphocyte": 1}).rounding_note() == ""
    assert differential_of({}).rounding_note() == ""


def _screen_page(out) -> str:
    import http.client

    from bmc.edge_app.ui.app import UiApp

    with serving(UiApp(out.parent, None, sign_in=False, user="anna")) as port:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", f"/s/{out.name}/", headers={"Host": f"127.0.0.1:{port}"})
        r = c.getresponse()
        assert r.status == 200
        return r.read().decode()


def test_a_decision_on_the_screen_rewrites_the_report_beside_it(counted, tmp_path):
    """The report on disk follows the decisions: no stale report.html beside a newer cells.csv."""
    import shutil

    from bmc.edge_app.ui.app import UiApp

    out = tmp_path / "s"
    shutil.copytree(counted[0], out)
    waiting = [c for c in sessiondb.cells(sessiondb.connect(out)) if c.status == "pending"]
    assert waiting, "the session needs a cell set aside"
    before = _record(out).total
    import http.client

    with serving(UiApp(tmp_path, None, sign_in=False, user="anna")) as port:
        host = {"Host": f"127.0.0.1:{port}"}
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", f"/s/{out.name}/review", headers=host)
        r = c.getresponse()
        page = r.read().decode()
        cookie = r.getheader("Set-Cookie").split(";")[0]
        csrf = re.search(r"name='csrf' value='([^']+)'", page).group(1)
        c.request(
            "POST",
            f"/s/{out.name}/decide",
            body=f"csrf={csrf}&cell={waiting[0].id}&label=lymphocyte",
            headers={**host, "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert c.getresponse().status in (200, 303)
    after = _record(out)
    assert after.total == before + 1
    report = (out / "report.html").read_text()
    assert f"<b>{after.total}</b> leukocytes counted" in report
    assert json.loads((out / "differential.fhir.json").read_text())["entry"][0]["resource"]["conclusion"].startswith(
        f"Blood differential of {after.total} leukocytes"
    )


def test_a_marrow_count_is_per_100_nucleated_cells_with_the_me_ratio():
    r = differential_of({"neutrophil": 6, "erythroblast": 3, "lymphocyte": 1, "platelet": 4}, specimen="marrow")
    assert r.denominator == "nucleated cells" and r.total == 10 and r.platelets == 4
    assert r.share("erythroblast").percent == pytest.approx(30.0) and r.me_ratio == pytest.approx(2.0)
    b = differential_of({"neutrophil": 6, "erythroblast": 3, "lymphocyte": 1, "platelet": 4}, specimen="blood")
    assert b.total == 7 and b.nrbc.count == 3 and b.nrbc.percent == pytest.approx(300 / 7)
    assert b.share("neutrophil").percent == pytest.approx(600 / 7) and b.me_ratio is None
    with pytest.raises(ValueError, match="specimen"):
        differential_of({}, specimen="urine")


def test_bench_differential_scores_the_session_against_the_truth(bccd, tmp_path):
    """``bmc bench differential`` on 80 of BCCD's single-white-cell fields: the device's own
    differential and, after the simulated review of every cell set aside, one counted cell a field
    and a differential near the truth's."""
    truth = tmp_path / "truth.csv"
    bmc("bench", "truth", bccd, "--format", "bccd", "--out", truth)
    rows = truth.read_text().splitlines()
    truth.write_text("\n".join(rows[:81]) + "\n")
    out = tmp_path / "d.json"
    p = bmc("bench", "differential", "--source", bccd, "--truth", truth, "--orientations", "1", "--json", out)
    r = json.loads(out.read_text())
    assert "| neutrophil |" in p.stdout and "Largest gap after review" in p.stdout
    assert r["cells"] == 80 and 0 < r["set_aside_share"] < 1
    assert r["after_review"]["total"] == 80 - r["fields_without_their_cell"]
    assert r["alone"]["total"] < r["after_review"]["total"]
    assert r["worst_gap_after_review_pp"] <= 5.0, r["gap_after_review_pp"]
    assert r["true"]["total"] == 80 and sum(x["percent"] for x in r["true"]["rows"]) == pytest.approx(100.0)

"""The differential as a FHIR R4 DiagnosticReport: a real session, validated with a well-kept FHIR
model package (fhir.resources, R4B: the same DiagnosticReport, Observation and Bundle as R4)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from bmc.edge_app import fhir
from bmc.edge_app.classifier import MODELS_DIR

from conftest import DATA, bmc


@pytest.fixture(scope="module")
def session(tmp_path_factory, matek):
    """Held-out PBC cells of every class and three Munich blasts, in cell mode."""
    folder = tmp_path_factory.mktemp("cells")
    by: dict[str, list] = {}
    for r in csv.DictReader(open(MODELS_DIR / "bmc_pbc8_lite0_test_split.csv")):
        by.setdefault(r["label"], []).append(r["path"])
    for paths in by.values():
        for p in paths[:4]:
            (folder / Path(p).name).symlink_to(DATA / p)
    for p in sorted((matek / "BLA").glob("*.jpg"))[:3]:
        (folder / p.name).symlink_to(p)
    out = tmp_path_factory.mktemp("s") / "session"
    bmc("edge", "run", folder, "--mode", "cell", "--out", out, "--headless")
    return out


def test_the_report_is_valid_fhir_with_loinc_coded_shares_of_the_leukocytes(session):
    p = bmc("edge", "report", session, "--fhir")
    assert "differential.fhir.json" in p.stdout
    doc = json.loads((session / "differential.fhir.json").read_text())
    Bundle.model_validate(doc)  # raises on anything FHIR does not allow
    report = doc["entry"][0]["resource"]
    observations = [e["resource"] for e in doc["entry"][1:]]
    assert report["resourceType"] == "DiagnosticReport" and report["code"]["coding"][0]["code"] == "24318-8"
    assert "subject" not in report  # the device never knows the patient
    assert {r["reference"] for r in report["result"]} == {e["fullUrl"] for e in doc["entry"][1:]}
    rows = list(csv.DictReader(open(session / "cells.csv")))
    pending = sum(r["counted_as"] == "" for r in rows)
    assert pending and report["status"] == "preliminary" and f"{pending} cells wait for review" in report["conclusion"]
    by_class = {o["code"]["text"]: o for o in observations}
    assert by_class["lymphocyte"]["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "737-7",
        "display": "Lymphocytes/100 leukocytes in Blood by Manual count",
    }
    # total neutrophils under the code that means them, not the bands' (26508-2 is "Band form neutrophils")
    assert by_class["neutrophil"]["code"]["coding"][0]["code"] == "23761-0"
    codes = [code for code, _ in fhir.LOINC_MANUAL.values()]
    assert len(codes) == len(set(codes)) and "26508-2" not in codes
    leukocyte_shares = sum(
        o["valueQuantity"]["value"] for label, o in by_class.items() if label not in ("erythroblast", "platelet")
    )
    assert leukocyte_shares == pytest.approx(100, abs=0.5)  # per 100 leukocytes: erythroblasts and platelets aside
    assert "valueQuantity" not in by_class.get("platelet", {"x": 1})
    counts = {label: o["component"][0]["valueQuantity"]["value"] for label, o in by_class.items()}
    assert counts == {label: sum(r["counted_as"] == label for r in rows) for label in counts}
    # each share's exact 95% limits as a Range a LIS can read, around the share itself
    lymph = by_class["lymphocyte"]
    limits = lymph["component"][1]["valueRange"]
    assert limits["low"]["value"] <= lymph["valueQuantity"]["value"] <= limits["high"]["value"]
    assert f"{limits['low']['value']:.1f}–{limits['high']['value']:.1f}%" in lymph["note"][0]["text"]
    assert not any(o["code"]["text"].startswith("estimated accuracy") for o in observations)  # not calibrated


def test_a_reviewed_session_is_final_and_the_validator_is_strict(session, tmp_path):
    rows = list(csv.DictReader(open(session / "cells.csv")))
    decisions = tmp_path / "d.csv"
    with open(decisions, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        for r in rows:
            if r["counted_as"] == "":
                w.writerow([r["id"], "blast" if "BLA_" in r["source"] else r["label"]])
    bmc("edge", "review", session, "--apply", decisions, "--by", "anna", "--new-label")
    doc = fhir.diagnostic_report(session)
    Bundle.model_validate(doc)
    assert doc["entry"][0]["resource"]["status"] == "final"
    # who decided cells goes with the report (the device knows the reviewers, not the patient)
    assert "Cells decided at the device by anna." in doc["entry"][0]["resource"]["conclusion"]
    blast = next(e["resource"] for e in doc["entry"] if e["resource"].get("code", {}).get("text") == "blast")
    assert [c["system"] for c in blast["code"]["coding"]] == [fhir.BMC_CODES]  # no LOINC code guessed for it
    # the model package refuses what FHIR does not define: a misspelt element, a value that is no number
    bad = copy.deepcopy(doc)
    bad["entry"][0]["resource"]["subjct"] = {"reference": "Patient/1"}
    with pytest.raises(ValidationError):
        Bundle.model_validate(bad)
    bad = copy.deepcopy(doc)
    bad["entry"][1]["resource"]["valueQuantity"]["value"] = "about half"
    with pytest.raises(ValidationError):
        Bundle.model_validate(bad)
    # status codes from R4's value sets (the model package leaves codes unchecked)
    assert all(e["resource"]["status"] in ("registered", "preliminary", "final", "corrected") for e in doc["entry"])


def test_one_folder_is_one_report_and_a_change_after_final_is_a_correction(session, tmp_path):
    """Every export of a folder (the file rewritten after each decision, the screen's download, a
    copy on a USB stick) is the same DiagnosticReport: one id and identifier, one Observation id per
    class, so a LIS files the later over the earlier. The folder records each report it issues: once
    one went out final, a decision that moves a cell makes the next ``corrected``, a comment makes it
    ``amended``, each naming the report it replaces; cells waiting again make it preliminary, saying
    which report still stands."""
    import shutil

    from bmc.edge_app import review, sessiondb

    folder = tmp_path / "s"
    shutil.copytree(session, folder)
    rows = list(csv.DictReader(open(folder / "cells.csv")))
    decisions = tmp_path / "d.csv"
    decisions.write_text(
        "id,label\n"
        + "".join(
            f"{r['id']},{'blast' if 'BLA_' in r['source'] else r['label']}\n" for r in rows if r["counted_as"] == ""
        )
    )
    bmc("edge", "review", folder, "--apply", decisions, "--by", "anna", "--new-label")

    def issued(where=folder):
        doc = fhir.diagnostic_report(where, issue=True)
        Bundle.model_validate(doc)
        report = doc["entry"][0]["resource"]
        return report, {e["resource"]["code"]["text"]: e["resource"]["id"] for e in doc["entry"][1:]}

    def records():
        db = sessiondb.connect(folder)
        try:
            return [e.status for e in sessiondb.exports(db)]
        finally:
            db.close()

    final, obs = issued()
    assert final["status"] == "final" and "Replaces" not in final["conclusion"]
    assert final["identifier"] == [{"system": fhir.IDENTIFIER_SYSTEM, "value": f"urn:uuid:{final['id']}"}]
    again, obs_again = issued()
    assert (again, obs_again) == (final, obs)  # nothing changed: the report as it went out, its issued time too
    assert records()[-1] == "final" and records().count("final") == 1  # the same report is recorded once
    copy_ = tmp_path / "usb" / "s"
    shutil.copytree(folder, copy_)
    assert issued(copy_)[0]["id"] == final["id"]  # a copy of the folder is the same report
    # a reviewer moves a counted lymphocyte to monocyte (the file beside it is rewritten): corrected
    lymph = next(r for r in rows if r["counted_as"] == "lymphocyte" and r["reviewed_label"] == "")
    bmc("edge", "review", folder, "--cell", lymph["id"], "--label", "monocyte", "--by", "bob")
    on_disk = json.loads((folder / "differential.fhir.json").read_text())["entry"][0]["resource"]
    corrected, obs_corrected = issued()
    assert on_disk["status"] == corrected["status"] == "corrected" and corrected["id"] == final["id"]
    assert obs_corrected["lymphocyte"] == obs["lymphocyte"]
    assert (
        "Replaces the final report issued" in corrected["conclusion"]
        and "corrected after review" in corrected["conclusion"]
    )
    # a decision withdrawn on a cell that waited: the corrected report stands, unchanged, while it waits
    # (a LIS filing exports over each other would otherwise file unfinished numbers over a released report)
    waited = next(r for r in rows if r["flag"])
    label = next(r for r in _cells(folder) if r["id"] == waited["id"])["reviewed_label"]
    bmc("edge", "review", folder, "--cell", waited["id"], "--undo", "--by", "bob")
    assert issued()[0] == corrected
    assert "Cells waiting for review (1" in (folder / "report.html").read_text()  # the report shows it waits
    # decided again as before: the corrected report, as it went out
    bmc("edge", "review", folder, "--cell", waited["id"], "--label", label, "--by", "bob", "--new-label")
    assert issued()[0]["status"] == "corrected"
    # a comment alone: amended
    review.add_note(folder, "stain a little pale", "anna")
    amended, _ = issued()
    assert amended["status"] == "amended" and "Replaces the corrected report issued" in amended["conclusion"]
    assert fhir.folder_identity([]) != final["id"]  # another folder is another report


def _cells(folder):
    return list(csv.DictReader(open(folder / "cells.csv")))


def test_a_session_still_recording_is_preliminary_whatever_is_decided(session, tmp_path):
    """A download while a session records (the screen's Live page) is preliminary even with nothing
    waiting: more cells are coming."""
    import shutil
    import sqlite3

    from bmc.edge_app.folder_lock import lock_folder

    folder = tmp_path / "s"
    shutil.copytree(session, folder)
    rows = list(csv.DictReader(open(folder / "cells.csv")))
    decisions = tmp_path / "d.csv"
    decisions.write_text("id,label\n" + "".join(f"{r['id']},rejected\n" for r in rows if r["counted_as"] == ""))
    bmc("edge", "review", folder, "--apply", decisions, "--by", "anna")  # nothing waits
    db = sqlite3.connect(folder / "session.sqlite")
    db.execute("DELETE FROM export")  # a folder that has issued no report yet (one that had keeps it standing)
    db.execute("UPDATE session SET status = 'running', ended = NULL")
    db.commit()
    db.close()
    lock = lock_folder(folder)  # as the recorder holds it
    try:
        report = fhir.diagnostic_report(folder)["entry"][0]["resource"]
        assert report["status"] == "preliminary"
    finally:
        lock.close()
    # the recorder gone (killed): no longer recording, and nothing waits
    assert fhir.diagnostic_report(folder)["entry"][0]["resource"]["status"] == "final"

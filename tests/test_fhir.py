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
    assert all(e["resource"]["status"] in ("registered", "preliminary", "final", "amended") for e in doc["entry"])

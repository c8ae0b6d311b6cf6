"""The technician's screen (``bmc edge ui``): real sessions of BCCD fields, a real waitress server
on 127.0.0.1 (or bound to 0.0.0.0 and reached through 127.0.0.1), real HTTP, and a real headless
Chromium driving the review. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
from bmc.edge_app.session import EdgeSession, SessionConfig
from bmc.edge_app.ui import auth
from bmc.edge_app.ui.app import UiApp

from conftest import ROOT, bmc

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def recorded(bccd, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fields")
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:12]:
        (src / f.name).symlink_to(f)
    storage = tmp_path_factory.mktemp("storage")
    EdgeSession(
        str(src),
        CellClassifier(DEFAULT_MODEL, threads=2),
        storage / "20261128-0900",
        SessionConfig(),
        echo=lambda m: None,
    ).run()
    return storage


@pytest.fixture
def storage(recorded, tmp_path) -> Path:
    out = tmp_path / "storage"
    shutil.copytree(recorded, out)
    return out


class Server:
    def __init__(self, app: UiApp, host: str = "127.0.0.1", threads: int = 2):
        from waitress import create_server

        self.app = app
        self.server = create_server(app, host=host, port=0, threads=threads)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: str = "", headers: dict | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if body:
            h["Content-Type"] = "application/x-www-form-urlencoded"
        c.request(method, path, body=body.encode(), headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data

    def close(self):
        from bmc.edge_app.ui.app import stop_from_another_thread

        stop_from_another_thread(self.server, self.thread)


@pytest.fixture
def local(storage):
    s = Server(UiApp(storage, None, sign_in=False, user="anna"))
    yield s
    s.close()


def _cookie(headers) -> str:
    return headers["Set-Cookie"].split(";")[0]


def _csrf(page: bytes) -> str:
    return re.search(rb"name='csrf' value='([^']+)'", page).group(1).decode()


def _reviews(storage: Path) -> list[tuple]:
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    try:
        return db.execute("SELECT cell_id, label, reviewer FROM review ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def _exports(storage: Path) -> int:
    """How many reports the folder records as issued."""
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM export").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _first_pending(storage: Path) -> int:
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    cid = db.execute("SELECT id FROM cell WHERE flag != '' ORDER BY id").fetchone()[0]
    db.close()
    return cid


def test_pages_show_the_sessions_differential_and_review_queue(local, storage):
    status, headers, page = local.request("GET", "/")
    assert status == 200 and b"20261128-0900" in page
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    status, _, page = local.request("GET", "/s/20261128-0900/")
    assert status == 200 and b"95% limits" in page and b"counted" in page
    status, _, page = local.request("GET", "/s/20261128-0900/review")
    assert status == 200 and page.count(b"class='cell'") >= 3
    # why each cell waits, in a technician's words; the recorded reason, with its figures, on hover
    assert b">unlike the cells it learnt<" in page and re.search(rb"title='unknown: [^']*distance", page)
    assert b">unknown: unlike any known cell" not in page
    status, headers, icon = local.request("GET", "/static/icon.svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and icon.startswith(b"<svg")
    assert b"<link rel='icon' href='/static/icon.svg'>" in page
    status, headers, report = local.request("GET", "/s/20261128-0900/report")
    assert status == 200 and b"Differential count" in report
    # the FHIR report: a link followed (a GET) issues nothing; the session page's button (a POST with
    # its form's token) issues it, and a GET then gives that report as it went out
    status, _, page = local.request("GET", "/s/20261128-0900/fhir")
    assert status == 404 and b"no FHIR report of 20261128-0900 has been issued yet" in page
    status, headers, page = local.request("GET", "/s/20261128-0900/")
    assert b"action='/s/20261128-0900/fhir'" in page
    form = {"Cookie": _cookie(headers)}
    status, _, _ = local.request("POST", "/s/20261128-0900/fhir", "csrf=forged", form)
    assert status == 403 and _exports(storage) == 0
    status, headers, bundle = local.request("POST", "/s/20261128-0900/fhir", f"csrf={_csrf(page)}", form)
    assert status == 200 and headers["Content-Type"].startswith("application/fhir+json")
    assert json.loads(bundle)["entry"][0]["resource"]["resourceType"] == "DiagnosticReport" and _exports(storage) == 1
    status, _, again = local.request("GET", "/s/20261128-0900/fhir")
    assert status == 200 and json.loads(again) == json.loads(bundle) and _exports(storage) == 1


def test_a_decision_needs_the_forms_csrf_token_and_is_audited(local, storage):
    cid = _first_pending(storage)
    status, headers, page = local.request("GET", "/s/20261128-0900/review")
    cookie, csrf = _cookie(headers), _csrf(page)
    # a forged form: right cookie (a browser would add it), no token
    status, _, _ = local.request("POST", "/s/20261128-0900/decide", f"cell={cid}&label=monocyte", {"Cookie": cookie})
    assert status == 403 and _reviews(storage) == []
    status, _, _ = local.request(
        "POST", "/s/20261128-0900/decide", f"cell={cid}&label=monocyte&csrf=forged", {"Cookie": cookie}
    )
    assert status == 403 and _reviews(storage) == []
    status, headers, _ = local.request(
        "POST", "/s/20261128-0900/decide", f"cell={cid}&label=monocyte&csrf={csrf}", {"Cookie": cookie}
    )
    assert status == 303 and _reviews(storage) == [(cid, "monocyte", "anna")]
    rows = (storage / "20261128-0900" / "cells.csv").read_text()
    assert f",{cid},monocyte,anna,monocyte," in rows  # the same audited row bmc edge review writes


def test_loopback_answers_only_to_a_loopback_host(local):
    status, _, _ = local.request("GET", "/", headers={"Host": "evil.example:80"})  # DNS rebinding
    assert status == 403


@pytest.mark.parametrize(
    "path",
    [
        "/s/../../etc/passwd",
        "/s/%2e%2e/%2e%2e/etc/passwd",
        "/s//etc/passwd/",
        "/s/%2Fetc%2Fpasswd/",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static//etc/passwd",
        "/s/20261128-0900/../../../etc/passwd",
        "/s/20261128-0900/crop?id=../../etc/passwd",
        "/s/20261128-0900/crop?id=/etc/passwd",
    ],
)
def test_no_request_path_reaches_a_file_outside_the_storage(local, path):
    status, _, body = local.request("GET", path)
    assert status in (404, 400) and b"root:" not in body and b"import" not in body


def test_a_crop_path_in_the_database_leading_outside_is_not_served(local, storage):
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    cid = db.execute("SELECT id FROM cell WHERE crop != '' ORDER BY id").fetchone()[0]
    status, headers, body = local.request("GET", f"/s/20261128-0900/crop?id={cid}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    for bad in ("/etc/passwd", "../../../../etc/passwd", "crops/../../secret.jpg"):
        db.execute("UPDATE cell SET crop = ? WHERE id = ?", (bad, cid))
        db.commit()
        status, _, body = local.request("GET", f"/s/20261128-0900/crop?id={cid}")
        assert status == 404 and b"root:" not in body
    db.close()


def test_beyond_loopback_every_client_signs_in(storage, tmp_path):
    """Bound to 0.0.0.0 (reached here through 127.0.0.1 only): a local client must sign in too."""
    auth.set_password(tmp_path / "cfg", PASSWORD)
    s = Server(UiApp(storage, auth.stored_hash(tmp_path / "cfg"), sign_in=True), host="0.0.0.0")
    try:
        status, headers, _ = s.request("GET", "/")
        assert status == 303 and headers["Location"] == "/login"
        status, _, _ = s.request("GET", "/s/20261128-0900/review")
        assert status == 303
        status, _, _ = s.request("POST", "/s/20261128-0900/decide", "cell=1&label=monocyte")
        assert status == 403 and _reviews(storage) == []
        status, headers, _ = s.request("POST", "/login", f"user=anna&password={PASSWORD.replace(' ', '+')}")
        assert status == 303 and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        cookie = _cookie(headers)
        status, _, page = s.request("GET", "/s/20261128-0900/review", headers={"Cookie": cookie})
        assert status == 200 and b"anna" in page
        cid = _first_pending(storage)
        status, _, _ = s.request(
            "POST", "/s/20261128-0900/decide", f"cell={cid}&label=x&csrf={_csrf(page)}", {"Cookie": cookie}
        )
        assert status == 400  # not a label: refused, said, nothing recorded
        s.request(
            "POST", "/s/20261128-0900/decide", f"cell={cid}&label=rejected&csrf={_csrf(page)}", {"Cookie": cookie}
        )
        assert _reviews(storage) == [(cid, "rejected", "anna")]
        # five wrong passwords from one address, then even the right one waits
        for _ in range(5):
            status, _, page = s.request("POST", "/login", "user=mallory&password=guess")
            assert status == 200 and b"Wrong name or password" in page
        status, _, _ = s.request("POST", "/login", f"user=anna&password={PASSWORD.replace(' ', '+')}")
        assert status == 429
    finally:
        s.close()


def test_the_password_is_stored_as_a_salted_scrypt_hash(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bmc.cli", "edge", "ui", "--set-password", "--config-dir", str(tmp_path)],
        input=f"{PASSWORD}\n{PASSWORD}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    f = tmp_path / auth.PASSWORD_FILE
    stored = f.read_text()
    assert stored.startswith("scrypt$") and PASSWORD not in stored and PASSWORD not in p.stdout + p.stderr
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    assert auth.verify_password(PASSWORD, stored) and not auth.verify_password("correct horse batterY", stored)
    again = auth.hash_password(PASSWORD)
    assert again != stored.strip()  # salted
    with pytest.raises(auth.AuthError, match="at least 10 characters"):
        auth.hash_password("short")
    fresh = tmp_path / "fresh"
    with pytest.raises(auth.AuthError, match="at least 10 characters"):
        auth.set_password(fresh, "short")
    assert list(fresh.iterdir()) == []  # a refused password leaves no file behind


def test_listening_beyond_loopback_without_a_password_is_refused(storage, tmp_path):
    p = bmc(
        "edge",
        "ui",
        "--storage",
        storage,
        "--listen",
        "0.0.0.0:0",
        "--config-dir",
        tmp_path / "none",
        check=False,
        timeout=60,
    )
    assert p.returncode == 2 and "needs a password" in p.stderr
    for bad in ("127.0.0.1:99999", "127.0.0.1:http"):
        p = bmc("edge", "ui", "--storage", storage, "--listen", bad, check=False, timeout=60)
        assert p.returncode == 2 and f"'{bad}'" in p.stderr and "--listen" in p.stderr, p.stderr
    # technicians sharing the device's screen each sign in with --sign-in: not without a password
    p = bmc("edge", "ui", "--storage", storage, "--listen", "127.0.0.1:0", "--sign-in", "--config-dir",
            tmp_path / "none", check=False, timeout=60)  # fmt: skip
    assert p.returncode == 2 and "signing in needs a password" in p.stderr
    auth.set_password(tmp_path / "cfg", PASSWORD)
    ui = subprocess.Popen(
        [sys.executable, "-m", "bmc.cli", "edge", "ui", "--storage", str(storage), "--listen", "127.0.0.1:0",
         "--sign-in", "--config-dir", str(tmp_path / "cfg")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = ""
        while not line.startswith("bmc screen on"):
            line = ui.stdout.readline()
            assert line, "the screen did not start"
        port = int(re.search(r":(\d+)/", line).group(1))
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        r = c.getresponse()
        assert r.status == 303 and r.getheader("Location") == "/login"  # a local client signs in too
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    # a review key for a class no model here has (a typo) would be silently unused: refused, naming it
    cfg = tmp_path / "bmc.toml"
    cfg.write_text("[screen]\nkeys = { neutrofil = 'n' }\n")
    p = bmc("edge", "ui", "--storage", storage, "--config", cfg, "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert p.returncode == 2 and "[screen] keys names 'neutrofil', which no model here has" in p.stderr, p.stderr


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser(tmp_path):
    if not (_chromium() and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium and chromium-driver (.ci/run): not found")
        pytest.skip("no chromium / chromedriver here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_a_technician_reviews_three_cells_in_a_real_browser(local, storage, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = Path(os.environ.get("BMC_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{local.port}"
    browser.get(base + "/")
    assert "20261128-0900" in browser.page_source
    browser.find_element(By.LINK_TEXT, "20261128-0900").click()
    assert "95% limits" in browser.page_source
    browser.save_screenshot(str(shots / "session.png"))
    browser.find_element(By.LINK_TEXT, "review them").click()
    cells = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")
    assert len(cells) >= 3
    first, second = (int(c.get_attribute("data-cell")) for c in cells[:2])
    browser.save_screenshot(str(shots / "review.png"))
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    def after(action, old, n):  # the decision is recorded and the page has reloaded
        action()
        WebDriverWait(browser, 30).until(lambda d: len(_reviews(storage)) >= n)
        WebDriverWait(browser, 30).until(EC.staleness_of(old))
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#todo .cell"))

    # 1. a click on a class: the digits go to the classes by how often a differential meets them
    # (neutrophil 1, lymphocyte 2, monocyte 3, eosinophil 4, basophil 5, ig 6, …)
    six = cells[0].find_element(By.CSS_SELECTOR, "button[data-key='6']")
    assert six.get_attribute("value") == "ig"
    assert cells[0].find_element(By.CSS_SELECTOR, "button[data-key='1']").get_attribute("value") == "neutrophil"
    after(six.click, cells[0], 1)
    # 2. a key on the selected cell (the first waiting one is selected when the page loads)
    top = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")[0]
    assert int(top.get_attribute("data-cell")) == second
    after(lambda: browser.switch_to.active_element.send_keys("x"), top, 2)
    # 3. Enter: the model's call for the next one
    top = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")[0]
    third = int(top.get_attribute("data-cell"))
    after(lambda: browser.switch_to.active_element.send_keys(Keys.ENTER), top, 3)
    rows = _reviews(storage)
    labels = CellClassifier(DEFAULT_MODEL).labels
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    model_call = db.execute("SELECT label FROM cell WHERE id = ?", (third,)).fetchone()[0]
    db.close()
    assert rows == [(first, "ig", "anna"), (second, "rejected", "anna"), (third, model_call, "anna")]
    assert "ig" in labels
    # 4. b right after a decision takes that decision back (the latest decided cell)
    top = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")[0]
    after(lambda: browser.switch_to.active_element.send_keys("b"), top, 4)
    assert _reviews(storage)[-1] == (third, None, "anna")
    browser.save_screenshot(str(shots / "after_review.png"))
    # 5. a decision on a cell's own page returns to that page (the form says so: no Referer is sent)
    browser.get(base + f"/s/20261128-0900/cell/{third}")
    old_page = browser.find_element(By.TAG_NAME, "body")
    browser.find_element(By.CSS_SELECTOR, "button[value='monocyte']").click()
    WebDriverWait(browser, 30).until(EC.staleness_of(old_page))
    assert browser.current_url == base + f"/s/20261128-0900/cell/{third}"
    assert _reviews(storage)[-1] == (third, "monocyte", "anna") and "Decided: " in browser.page_source
    browser.get(base + "/s/20261128-0900/report")
    # the report is built for this request (a few seconds on a loaded machine): wait for it, up to 60 s
    WebDriverWait(browser, 60).until(lambda d: "Differential count" in d.page_source)
    assert "Differential count" in browser.page_source and "anna" in browser.page_source
    browser.save_screenshot(str(shots / "report.png"))
    for f in ("session.png", "review.png", "after_review.png", "report.png"):
        assert (shots / f).stat().st_size > 5000


def test_the_review_keys_follow_the_layout_the_technician_set(storage, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Server(UiApp(storage, None, sign_in=False, user="anna", keys={"lymphocyte": "l", "neutrophil": "1"}))
    try:
        browser.get(f"http://127.0.0.1:{s.port}/s/20261128-0900/review")
        first = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")[0]
        keys = {
            b.get_attribute("value"): b.get_attribute("data-key")
            for b in first.find_elements(By.CSS_SELECTOR, "button[data-key]")
            if b.get_attribute("data-key") not in ("Enter", "x", "b")
        }
        # the configured keys, and the free digits for the other classes, commonest first
        assert keys["lymphocyte"] == "l" and keys["neutrophil"] == "1"
        assert (keys["monocyte"], keys["eosinophil"], keys["basophil"]) == ("2", "3", "4")
        # the buttons stay in the classes' order (the commonest first): a lettered class keeps its place
        assert list(keys)[:3] == ["neutrophil", "lymphocyte", "monocyte"]
        cid = int(first.get_attribute("data-cell"))
        browser.switch_to.active_element.send_keys("l")
        WebDriverWait(browser, 30).until(lambda d: _reviews(storage))
        assert _reviews(storage) == [(cid, "lymphocyte", "anna")]
    finally:
        s.close()


def test_a_key_never_decides_a_cell_out_of_view(storage, browser):
    """Scrolled down and clicked on blank space, no cell is selected: a class key must not decide the
    first waiting cell, far above and out of sight. It is brought into view and selected; the next
    key press decides it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Server(UiApp(storage, None, sign_in=False, user="anna"))
    try:
        browser.get(f"http://127.0.0.1:{s.port}/s/20261128-0900/review")
        first = browser.find_elements(By.CSS_SELECTOR, "#todo .cell")[0]
        cid = int(first.get_attribute("data-cell"))
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight); document.activeElement.blur();")
        assert not browser.execute_script("return inView(arguments[0])", first)
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("2")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script("return inView(arguments[0])", first))
        time.sleep(0.5)  # a decision, had one gone out, is recorded by now
        assert _reviews(storage) == []
        assert browser.switch_to.active_element == first
        label = first.find_element(By.CSS_SELECTOR, "button[data-key='2']").get_attribute("value")
        browser.switch_to.active_element.send_keys("2")
        WebDriverWait(browser, 30).until(lambda d: _reviews(storage))
        assert _reviews(storage) == [(cid, label, "anna")]
    finally:
        s.close()


def test_a_technician_counts_from_the_live_page_in_a_real_browser(storage, bccd, browser, tmp_path):
    """In Chromium: start a session on BCCD fields from the Live page, watch its counts rise on the
    page, stop it, then open its differential and its report."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bmc.edge_app.ui.live import LiveRunner

    src = tmp_path / "fields"
    src.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg")):
        (src / f.name).symlink_to(f)
    live = LiveRunner(storage, str(src), None)
    s = Server(UiApp(storage, None, sign_in=False, user="anna", live=live))
    try:
        base = f"http://127.0.0.1:{s.port}"
        browser.get(base + "/live")
        browser.find_element(By.XPATH, "//button[text()='Start a session']").click()
        counted = []

        def rising(d):  # the page's own state box, refreshed by its script from /live/state
            # read in one script call: the page reloads after Start, and an element fetched before
            # a reload is stale by the time its text is read
            text = d.execute_script("const e = document.getElementById('state'); return e ? e.textContent : '';")
            m = re.search(r"(\d+)(?: of \d+)? leukocytes counted", text or "")
            counted.append(int(m.group(1)) if m else -1)
            return len({c for c in counted if c > 0}) >= 2

        WebDriverWait(browser, 90, poll_frequency=0.3).until(rising)
        stop = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.XPATH, "//button[text()='Stop']")
        )
        stop.click()
        WebDriverWait(browser, 30).until(lambda d: not live.running)
        folder = live.folder.name
        browser.get(base + f"/s/{folder}/")
        assert "95% limits" in browser.page_source and "leukocytes counted" in browser.page_source
        browser.find_element(By.LINK_TEXT, "report").click()
        assert "Differential count" in browser.page_source
    finally:
        if live.running:
            live.stop()
        s.close()


def test_a_live_session_from_the_screen(storage, bccd, tmp_path):
    """Start a session from the page, watch frames arrive on the MJPEG stream with their capture
    time, the counts rise in /live/state, and stop it; the session is an ordinary session folder."""
    import json as _json

    from bmc.edge_app.config import ModelConfig
    from bmc.edge_app.ui.live import LiveRunner

    src = tmp_path / "fields"
    src.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:60]:
        (src / f.name).symlink_to(f)
    # the device config's [model] section, as bmc edge serve takes it (issue 25: the page ignored it)
    live = LiveRunner(storage, str(src), None, model_config=ModelConfig(orientations=1, threads=1))
    s = Server(UiApp(storage, None, sign_in=False, user="anna", live=live))
    try:
        status, headers, page = s.request("GET", "/live")
        cookie, csrf = _cookie(headers), _csrf(page)
        assert b"No session is running" in page
        status, _, _ = s.request("POST", "/live/start", f"csrf={csrf}&target=0", {"Cookie": cookie})
        assert status == 303 and live.running
        assert live.session.clf.orientations == 1
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        c.request("GET", "/live/stream", headers={"Host": f"127.0.0.1:{s.port}", "Cookie": cookie})
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("multipart/x-mixed-replace")
        data = b""
        while b"\r\n\r\n" not in data:
            data += r.read(1)
        head, _ = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"--frame") and b"X-Frame-Time:" in head and b"image/jpeg" in head
        length = int(head.split(b"Content-Length:")[1].strip())
        assert r.read(length)[:2] == b"\xff\xd8"  # a JPEG
        c.close()
        status, _, body = s.request("GET", "/live/state", headers={"Cookie": cookie})
        st = _json.loads(body)
        assert st["state"] in ("running", "paused", "finished") and st["frames"] >= 1
        if st["last_cells"]:  # the page's strip of the newest cells: crops served from the session
            status, headers, body = s.request(
                "GET", f"/s/{st['folder']}/crop?id={st['last_cells'][0]['id']}", headers={"Cookie": cookie}
            )
            assert status == 200 and body[:2] == b"\xff\xd8"
        status, _, _ = s.request("POST", "/live/pause", f"csrf={csrf}", {"Cookie": cookie})
        assert status == 303
        status, _, body = s.request("GET", "/live/state", headers={"Cookie": cookie})
        frames = _json.loads(body)["frames"]
        # paused, the stream gives the field shown and ends: a page left open holds no request thread
        t0 = time.monotonic()
        status, _, still = s.request("GET", "/live/stream", headers={"Cookie": cookie})
        # (the latest field, and the one in flight when Pause was pressed, which is finished)
        assert status == 200 and still.startswith(b"--frame") and still.count(b"--frame") <= 2
        assert time.monotonic() - t0 < 10  # not the 30 s a stream waits for a frame while counting
        status, _, _ = s.request("POST", "/live/stop", f"csrf={csrf}", {"Cookie": cookie})
        assert status == 303 and not live.running
        st = _json.loads(s.request("GET", "/live/state", headers={"Cookie": cookie})[2])
        assert st["state"] in ("stopped", "finished") and st["frames"] <= frames + 1
        db = sqlite3.connect(storage / st["folder"] / "session.sqlite")
        assert db.execute("SELECT status FROM session").fetchone()[0] in ("stopped", "finished")
        db.close()
        status, _, page = s.request("GET", "/", headers={"Cookie": cookie})
        assert st["folder"].encode() in page  # listed with the other sessions
    finally:
        live.stop()
        s.close()


def test_review_for_adaptation_lists_the_cells_that_teach_most(local, storage):
    from bmc.edge_app import review, sessiondb

    db = sessiondb.connect(storage / "20261128-0900")
    expected = [c.id for c in review.teaching_queue(sessiondb.cells(db), 10)]
    db.close()
    status, _, page = local.request("GET", "/s/20261128-0900/review?for=adapt")
    assert status == 200 and b"to name for adaptation" in page
    shown = [int(x) for x in re.findall(rb"data-cell='(\d+)'", page)]
    assert shown == expected
    assert b">counted</span>" in page  # the model's sure calls too, not only the cells set aside


def test_a_cells_detail_shows_its_probabilities_and_where_the_model_looked(local, storage):
    cid = _first_pending(storage)
    status, _, page = local.request("GET", f"/s/20261128-0900/cell/{cid}")
    assert status == 200 and b"Where the model looked" in page and b"probability" in page
    # which session it belongs to, with the way back (several sessions may be open in tabs)
    assert f"Cell {cid} of 20261128-0900".encode() in page and b"href='/s/20261128-0900/'>20261128-0900</a>" in page
    label = re.search(rb"/map\?label=([a-z]+)", page).group(1).decode()
    status, headers, body = local.request("GET", f"/s/20261128-0900/cell/{cid}/map?label={label}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, _, _ = local.request("GET", f"/s/20261128-0900/cell/{cid}/map?label=notaclass")
    assert status == 404


def test_a_saved_count_is_corrected_from_the_cells_detail(local, storage):
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    cid, label = db.execute("SELECT id, label FROM cell WHERE flag = '' ORDER BY id").fetchone()  # counted
    db.close()
    other = "basophil" if label != "basophil" else "eosinophil"
    status, headers, page = local.request("GET", f"/s/20261128-0900/cell/{cid}")
    assert status == 200 and b"Name this cell" in page
    cookie, csrf = _cookie(headers), _csrf(page)
    status, _, _ = local.request(
        "POST", "/s/20261128-0900/decide", f"csrf={csrf}&cell={cid}&label={other}", {"Cookie": cookie}
    )
    assert status == 303 and _reviews(storage)[-1] == (cid, other, "anna")
    rows = {int(r["id"]): r for r in csv.DictReader(open(storage / "20261128-0900" / "cells.csv"))}
    assert rows[cid]["counted_as"] == other and rows[cid]["label"] == label  # the model's call stays beside it
    status, _, page = local.request("GET", f"/s/20261128-0900/cell/{cid}", headers={"Cookie": cookie})
    assert b"Change the decision" in page


def test_sigterm_closes_the_screens_live_session_cleanly(storage, bccd, tmp_path):
    """systemd stops the screen with SIGTERM: a session recording from its Live page is closed as
    'stopped', not left 'running'."""
    import signal
    import time

    src = tmp_path / "fields"
    src.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:200]:
        (src / f.name).symlink_to(f)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bmc.cli",
            "edge",
            "ui",
            "--storage",
            str(storage),
            "--source",
            str(src),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", proc.stdout.readline()).group(1))
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/live", headers={"Host": f"127.0.0.1:{port}"})
        r = c.getresponse()
        cookie, csrf = r.getheader("Set-Cookie").split(";")[0], _csrf(r.read())
        c.request(
            "POST",
            "/live/start",
            body=f"csrf={csrf}&target=0",
            headers={
                "Host": f"127.0.0.1:{port}",
                "Cookie": cookie,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        assert c.getresponse().status == 303
        time.sleep(2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "closed: stopped" in out
    newest = sorted(d for d in storage.iterdir() if d.name != "20261128-0900")[-1]
    db = sqlite3.connect(newest / "session.sqlite")
    assert db.execute("SELECT status FROM session").fetchone()[0] == "stopped"
    db.close()


def test_a_session_comment_refuses_identifiers_and_shows_in_the_report(local, storage):
    status, headers, page = local.request("GET", "/s/20261128-0900/")
    cookie, csrf = _cookie(headers), _csrf(page)
    for bad in (
        "patient 12345678 recount",
        "mail j.doe@example.org",
        "born 03/04/1950",
        "born 1961-03-12",
        "DOB+12+Mar",
    ):
        status, _, body = local.request("POST", "/s/20261128-0900/note", f"csrf={csrf}&text={bad}", {"Cookie": cookie})
        assert status == 400 and b"patient identifier" in body
        assert b"Not saved:" in body and b"name='text'" in body  # the session page again, at its form
    assert (
        b"value='patient 12345678 recount'"
        in local.request(
            "POST", "/s/20261128-0900/note", f"csrf={csrf}&text=patient 12345678 recount", {"Cookie": cookie}
        )[2]
    )  # what was typed is kept, to edit
    status, _, _ = local.request(
        "POST", "/s/20261128-0900/note", f"csrf={csrf}&text=thick+smear,+stain+pale", {"Cookie": cookie}
    )
    assert status == 303
    page = local.request("GET", "/s/20261128-0900/", headers={"Cookie": cookie})[2]
    assert b"thick smear, stain pale" in page and b"anna" in page
    # the files on disk say it too, before anyone opens the report
    assert "thick smear, stain pale" in (storage / "20261128-0900" / "report.html").read_text()
    assert b"thick smear, stain pale" in local.request("GET", "/s/20261128-0900/report")[2]


def test_export_goes_only_to_a_mounted_stick(storage, tmp_path):
    media = tmp_path / "media"
    stick = media / "USB1"
    stick.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(stick)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    (media / "notmounted").mkdir()
    s = Server(UiApp(storage, None, sign_in=False, user="anna", export_roots=(str(media),)))
    try:
        status, headers, page = s.request("GET", "/s/20261128-0900/")
        cookie, csrf = _cookie(headers), _csrf(page)
        assert str(stick).encode() in page and b"notmounted" not in page
        for bad in (str(media / "notmounted"), "/tmp", "/etc"):
            status, _, _ = s.request("POST", "/s/20261128-0900/export", f"csrf={csrf}&to={bad}", {"Cookie": cookie})
            assert status == 400
        status, headers, _ = s.request("POST", "/s/20261128-0900/export", f"csrf={csrf}&to={stick}", {"Cookie": cookie})
        assert status == 303
        copy = stick / "20261128-0900"
        assert (
            (copy / "session.sqlite").is_file() and (copy / "report.html").is_file() and (copy / "cells.csv").is_file()
        )
        assert json.loads((copy / "differential.fhir.json").read_text())["type"] == "collection"
    finally:
        s.close()
        subprocess.run(["umount", str(stick)], check=False)


def test_twelve_parallel_requests_to_every_page_and_map_get_the_right_session(storage):
    """The screen under parallel use: two sessions, each with its own comment, and 12 requests at once
    to every page and to the where-the-model-looked maps. No 5xx, and each page shows its own session."""
    from concurrent.futures import ThreadPoolExecutor

    from bmc.edge_app import fhir
    from bmc.edge_app.review import add_note

    shutil.copytree(storage / "20261128-0900", storage / "20261128-1000")
    add_note(storage / "20261128-0900", "smear A, recount eosinophils", "anna")
    add_note(storage / "20261128-1000", "smear B, thick end", "ben")
    for name in ("20261128-0900", "20261128-1000"):
        fhir.write(storage / name)  # each has issued its report: the screen's GET gives it back
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    cell, label = db.execute("SELECT id, label FROM cell WHERE crop != '' LIMIT 1").fetchone()
    db.close()
    s = Server(UiApp(storage, None, sign_in=False, user="anna"), threads=8)
    try:
        pages = []
        for name, note in (("20261128-0900", "smear A"), ("20261128-1000", "smear B")):
            pages += [
                (f"/s/{name}/", note),
                (f"/s/{name}/review", name),
                (f"/s/{name}/cell/{cell}", f"cell {cell}"),
                (f"/s/{name}/cell/{cell}/map?label={label}", None),
                (f"/s/{name}/report", "Differential count"),
                (f"/s/{name}/fhir", "DiagnosticReport"),
            ]
        pages += [("/", "20261128-1000"), ("/device", "Device"), ("/adapt", "Adaptation")]

        def get(item):
            path, expect = item
            status, headers, body = s.request("GET", path)
            return path, status, expect, body

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(get, pages * 4))
        for path, status, expect, body in results:
            assert status < 500, (path, status, body[:300])
            assert status == 200, (path, status, body[:300])
            if expect:
                assert expect.encode() in body, (path, expect)
        for path, _, _, body in results:  # a session's page never shows the other's comment
            if path == "/s/20261128-0900/":
                assert b"smear B" not in body
            if path == "/s/20261128-1000/":
                assert b"smear A" not in body
    finally:
        s.close()


def test_the_review_grid_says_how_many_it_shows_and_pages_the_rest(storage):
    s = Server(UiApp(storage, None, sign_in=False, user="anna"))
    s.app.REVIEW_PAGE = 3
    try:
        status, _, page = s.request("GET", "/s/20261128-0900/review")
        waiting = int(re.search(rb"(\d+) cells wait for review", page).group(1))
        assert waiting > 3 and f"Showing 1–3 of {waiting}".encode() in page and page.count(b"class='cell'") == 3
        status, _, page2 = s.request("GET", "/s/20261128-0900/review?page=2")
        assert status == 200 and f"Showing 4–{min(6, waiting)} of {waiting}".encode() in page2
        first = re.findall(rb"data-cell='(\d+)'", page)
        second = re.findall(rb"data-cell='(\d+)'", page2)
        assert not set(first) & set(second)
    finally:
        s.close()


def test_a_live_page_without_a_camera_still_has_its_navigation(storage):
    s = Server(UiApp(storage, None, sign_in=False, user="anna"))
    try:
        status, _, page = s.request("GET", "/live")
        assert status == 200 and b"No camera or source is set up" in page and b"<a href='/'>Sessions</a>" in page
        status, _, page = s.request("POST", "/live/start", "target=10")
        assert status in (403, 404) and b"<a href='/'>Sessions</a>" in page
    finally:
        s.close()


def test_a_refused_decision_says_what_in_the_screens_words(local, storage):
    """No server path and no command-line flag in what the technician reads."""
    status, headers, page = local.request("GET", "/s/20261128-0900/review")
    csrf, cookie = _csrf(page), _cookie(headers)
    cid = _first_pending(storage)
    for form, said in (
        ("cell=999999&label=neutrophil", "no cell 999999 in this session"),
        (f"cell={cid}&label=blast", "is not a label"),
    ):
        status, _, page = local.request("POST", "/s/20261128-0900/decide", f"csrf={csrf}&{form}", {"Cookie": cookie})
        text = page.decode()
        assert status == 400 and said in text, text
        assert "--new-label" not in text and "session.sqlite" not in text and str(storage) not in text
    assert _reviews(storage) == []  # nothing recorded


def test_the_device_page_says_where_sessions_are_stored_and_the_disk_left(local, storage):
    status, _, page = local.request("GET", "/device")
    text = page.decode()
    assert status == 200 and f"sessions stored in {storage}" in text and "MB free" in text
    assert "live sessions: no camera or source set up" in text


def test_every_page_of_a_damaged_session_says_which_and_why_and_the_others_still_serve(local, storage):
    """A session.sqlite another program overwrote: the list marks it unreadable, each of its pages
    answers with the folder and the reason (not a bare "something went wrong"), and nothing of it is
    changed; the good session beside it still serves."""
    broken = storage / "20261128-1000"
    broken.mkdir()
    (broken / "session.sqlite").write_bytes(b"not a database at all\n")
    status, _, page = local.request("GET", "/")
    assert status == 200 and b"20261128-0900" in page and b"unreadable: unreadable session database" in page
    for path in ("/", "/review", "/report", "/fhir", "/cell/1", "/cell/1/map"):
        status, _, page = local.request("GET", f"/s/20261128-1000{path}")
        assert status == 500 and b"20261128-1000: unreadable session database" in page, (path, page[:300])
        assert b"Something went wrong" not in page and b"<title>bmc \xe2\x80\x94 Unreadable session</title>" in page, (
            path
        )
    status, _, page = local.request("GET", "/adapt")
    assert status == 200 and b"20261128-0900" in page
    # a session's files whose database was deleted or moved: listed, saying so
    lost = storage / "20261128-1200"
    lost.mkdir()
    (lost / "cells.csv").write_text("source,frame\n")
    status, _, page = local.request("GET", "/")
    assert status == 200 and b"no session.sqlite beside cells.csv: the session&#x27;s record is lost" in page, page[
        -900:
    ]
    # a database whose tables are there but whose pages are damaged: found in a query, said the same way
    import shutil

    torn = storage / "20261128-1100"
    shutil.copytree(storage / "20261128-0900", torn, ignore=shutil.ignore_patterns("session.lock", "*-wal", "*-shm"))
    size = (torn / "session.sqlite").stat().st_size
    assert size > 2 * 4096, "the recorded session needs pages to damage"
    with open(torn / "session.sqlite", "r+b") as fh:
        for offset in range(4096, size, 4096):  # every page but the first (the schema): each table's
            fh.seek(offset)
            fh.write(b"\xff" * 16)  # page header torn
    for path in ("/", "/review", "/report", "/fhir", "/cell/1"):
        status, _, page = local.request("GET", f"/s/20261128-1100{path}")
        assert status == 500 and b"20261128-1100: unreadable session database (" in page, (path, page[:300])
        assert b"Something went wrong" not in page, path
    assert (broken / "session.sqlite").read_bytes() == b"not a database at all\n" and len(list(broken.iterdir())) == 1
    status, _, page = local.request("GET", "/s/20261128-0900/report")
    assert status == 200 and b"Differential count" in page


def _signed_in(s: Server, name: str) -> tuple[str, bytes]:
    """(cookie, review page) of ``name`` signed in on ``s``."""
    status, headers, _ = s.request("POST", "/login", f"user={name}&password={PASSWORD.replace(' ', '+')}")
    assert status == 303
    cookie = _cookie(headers)
    status, _, page = s.request("GET", "/s/20261128-0900/review", headers={"Cookie": cookie})
    assert status == 200
    return cookie, page


def _seen(page: bytes, cid: int, action: str) -> str:
    """The review row a card's form says its page showed."""
    m = re.search(
        rf"action='/s/20261128-0900/{action}'><input type='hidden' name='csrf' value='[^']+'>"
        rf"<input type='hidden' name='cell' value='{cid}'><input type='hidden' name='seen' value='(\d+)'>".encode(),
        page,
    )
    assert m, f"no {action} form of cell {cid}"
    return m.group(1).decode()


def test_a_page_left_open_never_overwrites_a_newer_decision(storage, tmp_path):
    """Two technicians on one cell: anna decides it; ben, from the page he loaded before, decides it
    too and is told it was decided meanwhile (409), nothing recorded; anna's undo withdraws her own
    decision only while it is the latest, and an undo of nothing records nothing."""
    auth.set_password(tmp_path / "cfg", PASSWORD)
    s = Server(UiApp(storage, auth.stored_hash(tmp_path / "cfg"), sign_in=True), threads=4)
    try:
        cid = _first_pending(storage)
        anna, anna_page = _signed_in(s, "anna")
        ben, ben_page = _signed_in(s, "ben")
        seen = _seen(anna_page, cid, "decide")
        assert seen == _seen(ben_page, cid, "decide") == "0"
        form = "csrf={}&cell={}&seen={}&label={}"
        status, _, _ = s.request(
            "POST", "/s/20261128-0900/decide", form.format(_csrf(anna_page), cid, 0, "lymphocyte"), {"Cookie": anna}
        )
        assert status == 303
        status, _, page = s.request(
            "POST", "/s/20261128-0900/decide", form.format(_csrf(ben_page), cid, 0, "monocyte"), {"Cookie": ben}
        )
        assert status == 409 and f"cell {cid} was decided meanwhile (lymphocyte by anna".encode() in page
        assert b"nothing was recorded" in page and b"back to review, as it is now" in page
        assert [r for r in _reviews(storage) if r[0] == cid] == [(cid, "lymphocyte", "anna")]
        # ben reloads: his page shows anna's decision, and he may change it from there
        ben, ben_page = _signed_in(s, "ben")
        latest = _seen(ben_page, cid, "undo")
        assert latest != "0"
        status, _, _ = s.request(
            "POST", "/s/20261128-0900/decide", form.format(_csrf(ben_page), cid, latest, "monocyte"), {"Cookie": ben}
        )
        assert status == 303
        # anna's page still shows her own decision: her undo would withdraw ben's; it is refused
        anna, anna_page2 = _signed_in(s, "anna")
        status, _, page = s.request(
            "POST", "/s/20261128-0900/undo", f"csrf={_csrf(anna_page2)}&cell={cid}&seen={latest}", {"Cookie": anna}
        )
        assert status == 409 and b"(monocyte by ben" in page
        assert [r[1:] for r in _reviews(storage) if r[0] == cid] == [("lymphocyte", "anna"), ("monocyte", "ben")]
    finally:
        s.close()
    # the command line: an undo with nothing to withdraw says so and records nothing
    folder = storage / "20261128-0900"
    other = next(r for r in _pending_ids(storage) if r != cid)
    p = bmc("edge", "review", folder, "--cell", other, "--undo", check=False)
    assert p.returncode == 2 and f"cell {other} has no decision to withdraw" in p.stderr
    assert not [r for r in _reviews(storage) if r[0] == other]


def _pending_ids(storage: Path) -> list[int]:
    db = sqlite3.connect(storage / "20261128-0900" / "session.sqlite")
    ids = [r[0] for r in db.execute("SELECT id FROM cell WHERE flag != '' ORDER BY id")]
    db.close()
    return ids


def test_decisions_at_once_leave_the_folders_files_as_the_database_is(storage):
    """Every waiting cell decided at once from eight threads: the files rewritten after each decision
    take turns, so cells.csv ends as the database is, and once the report went out final no
    preliminary one is issued after it."""
    from concurrent.futures import ThreadPoolExecutor

    from bmc.edge_app import fhir

    folder = storage / "20261128-0900"
    fhir.write(folder)  # the FHIR file is there: every decision rewrites it too
    s = Server(UiApp(storage, None, sign_in=False, user="anna"), threads=8)
    try:
        status, headers, page = s.request("GET", "/s/20261128-0900/review")
        cookie, csrf = _cookie(headers), _csrf(page)
        pending = _pending_ids(storage)
        assert len(pending) >= 3

        def decide(cid):
            return s.request(
                "POST", "/s/20261128-0900/decide", f"csrf={csrf}&cell={cid}&seen=0&label=neutrophil", {"Cookie": cookie}
            )[0]

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(decide, pending)) == {303}
    finally:
        s.close()
    rows = {int(r["id"]): r for r in csv.DictReader(open(folder / "cells.csv"))}
    assert all(rows[c]["reviewed_label"] == "neutrophil" for c in pending)
    db = sqlite3.connect(folder / "session.sqlite")
    statuses = [r[0] for r in db.execute("SELECT status FROM export ORDER BY id")]
    db.close()
    assert statuses[-1] == "final" and "preliminary" not in statuses[statuses.index("final") :]
    assert json.loads((folder / "differential.fhir.json").read_text())["entry"][0]["resource"]["status"] == "final"


def test_reports_issued_at_once_from_an_unchanged_folder_are_one_report(storage):
    """Six downloads of a decided folder's FHIR report at once: one report goes on the record, and
    every download is that report."""
    from concurrent.futures import ThreadPoolExecutor

    from bmc.edge_app import review

    folder = storage / "20261128-0900"
    with review.Reviewer(folder, "anna") as r:
        for cid in _pending_ids(storage):
            r.decide(cid, "rejected")
    s = Server(UiApp(storage, None, sign_in=False, user="anna"), threads=6)
    try:
        status, headers, page = s.request("GET", "/s/20261128-0900/")
        cookie, csrf = _cookie(headers), _csrf(page)

        def download(_):
            return s.request("POST", "/s/20261128-0900/fhir", f"csrf={csrf}", {"Cookie": cookie})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(download, range(6)))
    finally:
        s.close()
    assert {a[0] for a in answers} == {200}
    assert len({a[2] for a in answers}) == 1 and _exports(storage) == 1


def test_exports_of_one_folder_at_once_each_leave_a_whole_copy(storage, tmp_path):
    """Three exports of one session to one stick at once (the screen and a command): they take turns,
    the copy on the stick is whole, nothing half-copied is left beside it, and the folder is marked."""
    from concurrent.futures import ThreadPoolExecutor

    from bmc.edge_app.service import EXPORTED_MARK, export

    folder, stick = storage / "20261128-0900", tmp_path / "stick"
    stick.mkdir()
    with ThreadPoolExecutor(3) as pool:
        targets = list(pool.map(lambda _: export(folder, stick), range(3)))
    assert targets == [stick / folder.name] * 3
    assert [p.name for p in stick.iterdir()] == [folder.name]
    copy = stick / folder.name
    crops = sorted(p.name for p in (folder / "crops").iterdir())
    assert crops and sorted(p.name for p in (copy / "crops").iterdir()) == crops
    db = sqlite3.connect(copy / "session.sqlite")
    assert db.execute("SELECT COUNT(*) FROM cell").fetchone()[0] > 0
    db.close()
    assert (folder / EXPORTED_MARK).read_text().split()[-1] == str(copy)
    assert copy.stat().st_mode & 0o777 == folder.stat().st_mode & 0o777  # readable as the session is, not 0700


def test_two_presses_of_start_start_one_session_that_stop_stops(storage, bccd, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from bmc.edge_app.config import ModelConfig
    from bmc.edge_app.ui.live import LiveRunner

    src = tmp_path / "fields"
    src.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:200]:
        (src / f.name).symlink_to(f)
    live = LiveRunner(storage, str(src), None, model_config=ModelConfig(orientations=1, threads=1))
    s = Server(UiApp(storage, None, sign_in=False, user="anna", live=live), threads=4)
    before = set(storage.iterdir())
    try:
        status, headers, page = s.request("GET", "/live")
        cookie, csrf = _cookie(headers), _csrf(page)

        barrier = threading.Barrier(2)

        def start(_):  # two presses at the same instant
            barrier.wait()
            try:
                return live.start(0)
            except RuntimeError as e:
                return str(e)

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(start, range(2)))
        assert sum(isinstance(a, Path) for a in answers) == 1, answers
        status, _, page = s.request("POST", "/live/start", f"csrf={csrf}&target=0", {"Cookie": cookie})
        assert status == 409 and b"a session is running already" in page
        assert len(set(storage.iterdir()) - before) == 1
        status, _, _ = s.request("POST", "/live/stop", f"csrf={csrf}", {"Cookie": cookie})
        assert status == 303 and not live.running
        live_threads = [t for t in threading.enumerate() if t.name == "live-session" and t.is_alive()]
        assert live_threads == []
    finally:
        live.stop()
        s.close()


def test_a_screen_asking_whether_a_folder_records_never_turns_a_recorder_away(storage):
    """The screen asks, many times a second, whether a folder is being recorded; a recorder starting
    meanwhile waits out the question instead of refusing the folder as someone else's."""
    from bmc.edge_app.folder_lock import is_locked, lock_folder

    folder = storage / "20261128-0900"
    done = threading.Event()

    def ask():
        while not done.is_set():
            is_locked(folder)

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for t in askers:
        t.start()
    try:
        for _ in range(200):
            lock_folder(folder).close()
    finally:
        done.set()
        for t in askers:
            t.join()


def test_sign_in_state_is_bounded_and_the_rate_limit_counts_before_it_checks():
    """A client that never sends its cookie back makes a session per request: the oldest go past the
    bound. Forty wrong sign-ins at once get at most five password checks."""
    from concurrent.futures import ThreadPoolExecutor

    sessions = auth.Sessions(most=50)
    first, working = sessions.create("anna"), sessions.create("ben")
    for _ in range(200):
        sessions.create("anna")
        assert sessions.get(working) is not None  # ben keeps working meanwhile
    assert len(sessions) == 50 and sessions.get(first) is None and sessions.get(working) is not None
    limit = auth.RateLimit(attempts=5)
    with ThreadPoolExecutor(40) as pool:
        let_through = [a for a in pool.map(lambda _: limit.attempt("10.0.0.7"), range(40)) if a is not None]
    assert len(let_through) == 5 and limit.attempt("10.0.0.7") is None
    ok = limit.attempt("10.0.0.8")
    limit.succeeded("10.0.0.8", ok)  # a right password is no failure
    assert all(limit.attempt("10.0.0.8") is not None for _ in range(5))


def test_a_decision_on_a_cells_own_page_returns_to_that_page(local, storage):
    cid = _first_pending(storage)
    status, headers, page = local.request("GET", f"/s/20261128-0900/cell/{cid}")
    assert status == 200 and f"name='cell' value='{cid}'><input type='hidden' name='seen' value='0'>".encode() in page
    assert b"name='back' value='cell'" in page  # the form says where it came from: the screen sends no Referer
    status, headers, _ = local.request(
        "POST",
        "/s/20261128-0900/decide",
        f"csrf={_csrf(page)}&cell={cid}&seen=0&back=cell&label=monocyte",
        {"Cookie": _cookie(headers)},
    )
    assert status == 303 and headers["Location"] == f"/s/20261128-0900/cell/{cid}"
    assert [r for r in _reviews(storage) if r[0] == cid] == [(cid, "monocyte", "anna")]


def test_the_outputs_lock_is_every_users_and_a_copy_gains_no_lock_file(storage, tmp_path, monkeypatch):
    """The service, the screen and a technician's command may run as different users: the outputs
    lock's folder is sticky and world-writable, its files writable by all, whatever the umask. A
    decision in an exported copy (no session.lock: never recorded there) leaves no lock file in it."""
    import stat

    from bmc.edge_app import folder_lock
    from bmc.edge_app.review import Reviewer

    monkeypatch.setattr(folder_lock, "OUTPUTS_LOCKS", tmp_path / "locks")
    old = os.umask(0o077)
    try:
        with folder_lock.outputs(storage / "20261128-0900"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "locks").stat().st_mode) == 0o1777
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "locks").iterdir()] == [0o666]
    copy = tmp_path / "copy"
    shutil.copytree(storage / "20261128-0900", copy, ignore=shutil.ignore_patterns("session.lock"))
    with Reviewer(copy, "anna") as r:
        r.decide(_first_pending(storage), "rejected")
    assert not (copy / "session.lock").exists()


def test_a_count_short_of_its_target_says_so_everywhere_it_goes(bccd, tmp_path):
    """A session whose fields ran out before its target (exit 3) and whose every waiting cell was then
    decided is a final report, but neither the LIS nor the report nor the screen may read it as the
    differential the laboratory asked for: each states the shortfall, and why. Times are shown in the
    device's time zone, named."""
    from fhir.resources.R4B.bundle import Bundle

    from bmc.edge_app import fhir, review

    fields = tmp_path / "fields"
    fields.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:6]:
        (fields / f.name).symlink_to(f)
    out = tmp_path / "short"
    p = bmc("edge", "run", fields, "--out", out, "--headless", "--target", "50", "--orientations", "1", check=False)
    assert p.returncode == 3, p.stderr
    with review.Reviewer(out, "anna") as r:
        for c in r.cells():
            if c.status == "pending":
                r.decide(c.id, c.model_label)
        n = sum(c.final_label not in (None, "platelet", "erythroblast") for c in r.cells())
    said = f"Short of its target: {n} of 50 leukocytes counted (the source ran out of fields)"
    doc = fhir.diagnostic_report(out, issue=True)
    Bundle.model_validate(doc)
    report = doc["entry"][0]["resource"]
    assert report["status"] == "final" and said in report["conclusion"], report["conclusion"]
    env = {**os.environ, "TZ": "Asia/Kolkata"}  # a zone with no summer time: the same name all year
    bmc("edge", "report", out, env=env)
    page = (out / "report.html").read_text()
    assert said in page and " IST</td>" in page
    s = Server(UiApp(out.parent, None, sign_in=False, user="anna"))
    try:
        status, _, body = s.request("GET", f"/s/{out.name}/")
    finally:
        s.close()
    assert status == 200 and said in body.decode() and "status <b>final</b>" in body.decode()
    # a 'running' row with no recorder holding the folder is a crash, not a count still going on
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    db = sqlite3.connect(crashed / "session.sqlite")
    db.execute("UPDATE session SET status = 'running'")
    db.commit()
    db.close()
    said = f"Short of its target: {n} of 50 leukocytes counted (the session ended without closing"
    assert said in fhir.diagnostic_report(crashed)["entry"][0]["resource"]["conclusion"]
    # a target met: the same sentence turns into what was asked for and reached
    enough = tmp_path / "enough"
    bmc("edge", "run", fields, "--out", enough, "--headless", "--target", "2", "--orientations", "1")
    assert "Target of 2 leukocytes reached" in fhir.diagnostic_report(enough)["entry"][0]["resource"]["conclusion"]

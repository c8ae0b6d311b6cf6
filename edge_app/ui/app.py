"""``bmc edge ui``: the technician's screen, a small web application served by the device.

Server-rendered pages with a little plain JavaScript, no CDN and no build step: it works with no
internet. It renders what the session databases and the report code already know (the counts come
from :mod:`bmc.edge_app.review`, the same functions as ``report.html`` and ``cells.csv``), and every
decision is the same audited row ``bmc edge review`` writes, under the signed-in name.

Pages: the sessions, one session's differential (each share with its 95% limits), the review grid
(click or keys 1-9, Enter, x, b), the HTML report, and the device check.

Safe on a clinic network (STYLE.md, "Servers on the device"):

* it listens on 127.0.0.1 unless told otherwise; any other address needs a password set on the
  device first (``bmc edge ui --set-password``), and then every client signs in, a local one too;
* on loopback only, requests must name a loopback host (no DNS rebinding);
* a random session token in an HttpOnly, SameSite=Strict cookie, a CSRF token on every change,
  failed sign-ins limited per address;
* sessions are looked up by name among the storage folder's sessions and files by cell id,
  through the same containment check as the report: no request path reaches a file outside it;
* errors are a plain page; details go to the log, never a password or token.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import os
import sqlite3
import threading
import urllib.parse
from http import cookies
from pathlib import Path

import cv2

from bmc.card import read_card
from bmc.edge_app import report as report_mod
from bmc.edge_app import review, sessiondb
from bmc.edge_app.ui.auth import RateLimit, Sessions, verify_password
from bmc.errors import BmcError

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "bmc_ui"
# the order a hematology differential is read in: granulocytes first, from the most mature
MAX_BODY = 64 * 1024
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


# the classes by how often a differential meets them (a blood smear: neutrophils, then lymphocytes,
# monocytes, eosinophils, bands, basophils; the rarer stages after), for the review keys 1-9
BY_FREQUENCY = [
    "neutrophil",
    "segmented",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "band",
    "basophil",
    "ig",
    "metamyelocyte",
    "myelocyte",
    "promyelocyte",
    "erythroblast",
    "platelet",
]


def _by_frequency(label: str) -> tuple[int, str]:
    return (BY_FREQUENCY.index(label) if label in BY_FREQUENCY else len(BY_FREQUENCY), label)


class Stream:
    """A streamed response (the live view's MJPEG): parts as they come, no length."""

    def __init__(self, parts, ctype: str):
        self.parts, self.ctype = parts, ctype
        self.status, self.headers, self.csp = "200 OK", [("Content-Type", ctype)], CSP


class Response:
    def __init__(
        self,
        body: bytes | str = b"",
        status: str = "200 OK",
        ctype: str = "text/html; charset=utf-8",
        headers: list[tuple[str, str]] | None = None,
        csp: str = CSP,
    ):
        self.body = body.encode() if isinstance(body, str) else body
        self.status, self.headers = status, [("Content-Type", ctype), *(headers or [])]
        self.csp = csp


def _redirect(to: str, headers=None) -> Response:
    return Response(b"", "303 See Other", headers=[("Location", to), *(headers or [])])


class UiError(BmcError, RuntimeError):
    """The screen cannot start as asked (its address taken, say); the message says what and where."""


class HttpError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class UiApp:
    """The WSGI application. ``sign_in``: every client must sign in (the server listens beyond
    loopback); else the local user is taken as signed in, and ``user`` names who decides."""

    def __init__(
        self,
        storage: str | Path,
        password_hash: str | None,
        sign_in: bool,
        user: str = "local",
        port: int = 0,
        model: str | Path | None = None,
        live=None,
        export_roots: tuple[str, ...] = ("/media", "/mnt", "/run/media"),
        keys: dict | None = None,
    ):
        if sign_in and not password_hash:
            raise ValueError("sign-in needs a password set on the device: bmc edge ui --set-password")
        self.storage = Path(storage)
        self.password_hash = password_hash
        self.sign_in = sign_in
        self.user = user
        self.port = port
        self.model = model
        self.sessions = Sessions()
        self.limit = RateLimit()
        self.live = live  # edge_app.ui.live.LiveRunner: the screen records sessions from the camera
        self.export_roots = export_roots
        self.keys = dict(keys or {})  # class -> review key ([screen] keys); the rest take free digits
        # shared by every request thread: the map makers (each model's, made once, behind a lock);
        # everything else a request computes stays in the request
        self._maps_lock = threading.Lock()
        self._map_makers: dict[Path, tuple] = {}

    # -- WSGI -------------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        try:
            resp = self.handle(environ)
        except HttpError as e:
            resp = Response(self.page(e.status, f"<p>{html.escape(e.message)}</p>", None, links=True), e.status)
        except Exception:  # noqa: BLE001 - a plain page for the browser, the details for the log
            log.exception("error serving %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            resp = Response(
                self.page("Error", "<p>Something went wrong; the device's log has the details.</p>", None, links=True),
                "500 Internal Server Error",
            )
        headers = resp.headers + [
            ("Content-Security-Policy", resp.csp),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-store"),
        ]
        if isinstance(resp, Stream):
            start_response(resp.status, headers)
            return resp.parts
        start_response(resp.status, headers + [("Content-Length", str(len(resp.body)))])
        return [resp.body]

    def handle(self, environ) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        if not self.sign_in:
            host = (environ.get("HTTP_HOST") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                raise HttpError("403 Forbidden", "this screen answers to 127.0.0.1 or localhost only")
        if path.startswith("/static/"):
            return self.static(path[len("/static/") :])
        token = self._token(environ)
        who = self.sessions.get(token)
        new_cookie = []
        if who is None and not self.sign_in:  # loopback: the local user, with a session for the CSRF token
            token = self.sessions.create(self.user)
            who = self.sessions.get(token)
            new_cookie = [self._cookie(token)]
        form = self._form(environ) if method == "POST" else {}
        if path == "/login":
            return self.login(method, form, environ)
        if who is None:
            if method == "POST":
                raise HttpError("403 Forbidden", "sign in first")
            return _redirect("/login")
        user, csrf = who
        if method == "POST" and form.get("csrf") != csrf:
            raise HttpError("403 Forbidden", "the form is out of date (or did not come from this screen); reload")
        resp = self.route(method, path, form, environ, user, csrf)
        resp.headers += new_cookie
        return resp

    def _cookie(self, token: str, max_age: int | None = None) -> tuple[str, str]:
        extra = f"; Max-Age={max_age}" if max_age is not None else ""
        return "Set-Cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{extra}"

    @staticmethod
    def _form(environ) -> dict[str, str]:
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            size = 0
        if size > MAX_BODY:
            raise HttpError("413 Payload Too Large", "request too large")
        body = environ["wsgi.input"].read(size).decode("utf-8", "replace") if size else ""
        # a repeated field (several sessions ticked) is kept whole, newline-joined; others: the last value
        return {
            k: "\n".join(v) if k == "session" else v[-1]
            for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()
        }

    # -- routes -----------------------------------------------------------------------------------
    def route(self, method: str, path: str, form: dict, environ, user: str, csrf: str) -> Response:
        parts = [p for p in path.split("/") if p]
        if method == "GET" and not parts:
            return Response(self.sessions_page(user, csrf))
        if method == "POST" and parts == ["logout"]:
            self.sessions.end(self._token(environ))
            return _redirect("/login" if self.sign_in else "/", [self._cookie("", 0)])
        if method == "GET" and parts == ["device"]:
            return Response(self.device_page(user, csrf))
        if parts and parts[0] == "live":
            return self.live_route(method, parts[1:], form, user, csrf)
        if parts == ["adapt"]:
            return Response(self.adapt_page(user, csrf) if method == "GET" else self.run_adapt(form, user, csrf))
        if method == "POST" and parts == ["adapt", "activate"]:
            return self.activate(form, user)
        if len(parts) >= 2 and parts[0] == "s":
            folder = self.session_folder(parts[1])
            rest = parts[2:]
            if method == "GET" and rest == []:
                return Response(self.session_page(folder, user, csrf))
            if method == "GET" and rest == ["review"]:
                query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
                teach = query.get("for", [""])[-1] == "adapt"
                page = query.get("page", ["1"])[-1]
                return Response(self.review_page(folder, user, csrf, teach, int(page) if page.isdigit() else 1))
            if method == "GET" and len(rest) == 2 and rest[0] == "cell":
                return Response(self.cell_page(folder, rest[1], user, csrf))
            if method == "GET" and len(rest) == 3 and rest[0] == "cell" and rest[2] == "map":
                label = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("label", [""])[-1]
                return self.cell_map(folder, rest[1], label)
            if method == "GET" and rest == ["crop"]:
                return self.crop(folder, urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("id", [""])[-1])
            if method == "GET" and rest == ["report"]:
                from bmc.edge_app.report import build_report

                return Response(build_report(folder).read_bytes(), csp=REPORT_CSP)
            if method == "GET" and rest == ["fhir"]:  # the differential for a laboratory information system
                from bmc.edge_app import fhir

                return Response(
                    json.dumps(fhir.diagnostic_report(folder), indent=2, ensure_ascii=False),
                    ctype="application/fhir+json; charset=utf-8",
                    headers=[("Content-Disposition", f'attachment; filename="{folder.name}.fhir.json"')],
                )
            if method == "POST" and rest == ["note"]:
                try:
                    review.add_note(folder, form.get("text", ""), user)
                except review.ReviewError as e:
                    raise HttpError("400 Bad Request", str(e)) from e
                return _redirect(f"/s/{urllib.parse.quote(folder.name)}/")
            if method == "POST" and rest == ["export"]:
                return self.export(folder, form.get("to", ""), user)
            if method == "POST" and rest in (["decide"], ["undo"]):
                return self.decide(folder, rest[0], form, user, environ)
        raise HttpError("404 Not Found", "no such page")

    @staticmethod
    def _token(environ) -> str | None:
        jar = cookies.SimpleCookie(environ.get("HTTP_COOKIE", ""))
        return jar[COOKIE].value if COOKIE in jar else None

    def static(self, name: str) -> Response:
        files = {"ui.css": "text/css; charset=utf-8", "ui.js": "text/javascript; charset=utf-8"}
        if name not in files:  # a fixed list: no path from the request reaches the file system
            raise HttpError("404 Not Found", "no such file")
        return Response((STATIC / name).read_bytes(), ctype=files[name], headers=[])

    def session_folder(self, name: str) -> Path:
        """The session folder called ``name`` among the storage folder's sessions, or 404."""
        from bmc.edge_app.service import session_dirs

        found = {d.name: d for d in session_dirs(self.storage)}
        if name not in found:
            raise HttpError("404 Not Found", "no such session")
        return found[name]

    def login(self, method: str, form: dict, environ) -> Response:
        if not self.sign_in:
            return _redirect("/")
        client = environ.get("REMOTE_ADDR", "?")
        message = ""
        if method == "POST":
            if self.limit.blocked(client):
                raise HttpError("429 Too Many Requests", "too many failed sign-ins from this address; wait 5 minutes")
            name = (form.get("user") or "").strip()[:40]
            if name and verify_password(form.get("password", ""), self.password_hash or ""):
                token = self.sessions.create(name)
                log.info("signed in: %s from %s", name, client)
                return _redirect("/", [self._cookie(token)])
            self.limit.failed(client)
            log.warning("failed sign-in from %s", client)
            message = "<p class='warn'>Wrong name or password.</p>"
        body = (
            f"{message}<form method='post' action='/login' class='login'>"
            "<label>Your name (recorded with each decision) <input name='user' required maxlength='40' "
            "autocomplete='username'></label><label>Device password <input name='password' type='password' "
            "required autocomplete='current-password'></label><button>Sign in</button></form>"
        )
        return Response(self.page("Sign in", body, None))

    def decide(self, folder: Path, action: str, form: dict, user: str, environ) -> Response:
        try:
            cell = int(form.get("cell", ""))
        except ValueError:
            raise HttpError("400 Bad Request", "no cell given") from None
        try:
            with review.Reviewer(folder, user, allow_new_labels=False) as r:
                if action == "undo":
                    r.undo(cell)
                    label = None
                else:
                    label = r.decide(cell, form.get("label", ""))
        except review.ReviewError as e:
            raise HttpError("400 Bad Request", str(e)) from e
        report_mod.write_session_files(folder, report=False)  # the report too, where one was written
        if "application/json" in environ.get("HTTP_ACCEPT", ""):
            return Response(json.dumps({"cell": cell, "label": label, "by": user}), ctype="application/json")
        back = "?for=adapt" if "for=adapt" in (environ.get("HTTP_REFERER") or "") else ""
        return _redirect(f"/s/{urllib.parse.quote(folder.name)}/review{back}")

    def _crop_path(self, folder: Path, cell_id: str) -> Path:
        from bmc.edge_app.report import session_file

        try:
            cid = int(cell_id)
        except ValueError:
            raise HttpError("404 Not Found", "no such cell") from None
        db = sessiondb.connect(folder)
        try:
            crop = sessiondb.crop_of(db, cid)
        finally:
            db.close()
        path = session_file(folder, crop) if crop else None
        if path is None or not path.is_file() or path.suffix.lower() != ".jpg":
            raise HttpError("404 Not Found", "no crop for this cell")
        return path

    def crop(self, folder: Path, cell_id: str) -> Response:
        return Response(self._crop_path(folder, cell_id).read_bytes(), ctype="image/jpeg")

    def _maps(self):
        """The counting model (the active adapted one, else the configured or shipped one) and its maps."""
        from bmc.edge_app.active import active_model
        from bmc.edge_app.cam import ActivationMaps
        from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

        path = Path(active_model(self.storage) or self.model or DEFAULT_MODEL)
        with self._maps_lock:  # one map maker per model, made once however many requests ask at once
            if path not in self._map_makers:
                clf = CellClassifier(path, threads=1, orientations=1)
                self._map_makers[path] = (clf, ActivationMaps(clf))  # its interpreter has a lock of its own
            return self._map_makers[path]

    def _model_input(self, folder: Path, cell_id: str, clf):
        from bmc.contract import preprocess, read_image

        return preprocess(read_image(str(self._crop_path(folder, cell_id))), clf.contract, "BGR", crop=False)

    def cell_page(self, folder: Path, cell_id: str, user: str, csrf: str) -> str:
        from bmc.edge_app.cam import MapError

        cells, _ = self._cells(folder)
        cell = next((c for c in cells if str(c.id) == cell_id), None)
        if cell is None:
            raise HttpError("404 Not Found", "no such cell")
        name = urllib.parse.quote(folder.name)
        probs = "".join(
            f"<tr><td>{html.escape(l)}</td><td class='num'>{p:.3f}</td></tr>"
            for l, p in sorted(zip(cell.labels, cell.probabilities), key=lambda t: -t[1])
        )
        maps = ""
        if cell.crop:
            try:
                clf, _ = self._maps()
                top = [l for l, _ in cell.top(2) if l in clf.labels]
                maps = "".join(
                    f"<figure><img src='/s/{name}/cell/{cell.id}/map?label={urllib.parse.quote(l)}' "
                    f"width='224' height='224' alt='where the model looked for {html.escape(l)}'>"
                    f"<figcaption>{html.escape(l)}</figcaption></figure>"
                    for l in top
                )
                maps = (
                    f"<h2>Where the model looked</h2><div class='grid'>{maps}</div><p class='small'>Class "
                    f"activation maps of {html.escape(clf.path.name)}: red, the parts of the cell that pushed "
                    "most towards that class.</p>"
                )
            except (MapError, ValueError, OSError) as e:
                maps = f"<p class='small'>No activation map: {html.escape(str(e))}</p>"
        img = (
            f"<img src='/s/{name}/crop?id={cell.id}' width='224' height='224' alt='cell {cell.id}'>"
            if cell.crop
            else ""
        )
        decided = (
            f"<p>Decided: <b>{html.escape(cell.reviewed_label)}</b> by {html.escape(cell.reviewer)}</p>"
            if cell.reviewed_label
            else ""
        )
        # a count can be corrected after it was saved: any cell, counted or decided, is decided (again) here,
        # as the audited review row; the earlier decision stays in the trail
        change = (
            f"<form method='post' action='/s/{name}/decide'><input type='hidden' name='csrf' value='{csrf}'>"
            f"<input type='hidden' name='cell' value='{cell.id}'><p>{'Change the decision' if cell.reviewed_label else 'Name this cell'}: "
            + "".join(f"<button name='label' value='{html.escape(l)}'>{html.escape(l)}</button>" for l in cell.labels)
            + "<button name='label' value='rejected'>not a cell</button></p></form>"
        )
        body = (
            f"<p>{html.escape(cell.source)} frame {cell.frame}; the model's call <b>{html.escape(cell.model_label)}"
            f"</b> {cell.confidence:.2f} {html.escape(cell.flag)}</p>{decided}<div class='grid'>{img}"
            f"<table><tr><th>class</th><th>probability</th></tr>{probs}</table></div>{change}{maps}"
            f"<p><a href='/s/{name}/review'>back to review</a></p>"
        )
        return self.page(f"Cell {cell.id}", body, csrf, user)

    def cell_map(self, folder: Path, cell_id: str, label: str) -> Response:
        from bmc.edge_app.cam import MapError, overlay

        try:
            clf, maps = self._maps()
            x = self._model_input(folder, cell_id, clf)
            picture = overlay(x, maps(x, label))
        except (MapError, ValueError) as e:
            raise HttpError("404 Not Found", str(e)) from e
        ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return Response(buf.tobytes(), ctype="image/jpeg")

    # -- pages ------------------------------------------------------------------------------------
    def page(self, title: str, body: str, csrf: str | None, user: str | None = None, links: bool = False) -> str:
        """A page of the screen: its navigation for a signed-in user (``csrf``), the links alone for
        an error page (``links``: a way back, nothing that needs a session)."""
        nav = (
            "<nav><a href='/live'>Live</a> <a href='/'>Sessions</a> <a href='/adapt'>Adaptation</a> "
            "<a href='/device'>Device</a></nav>"
            if links
            else ""
        )
        if csrf is not None:
            out = (
                f"<form method='post' action='/logout' class='inline'><input type='hidden' name='csrf' "
                f"value='{csrf}'><button>Sign out</button></form>"
                if self.sign_in
                else ""
            )
            nav = (
                f"<nav><a href='/live'>Live</a> <a href='/'>Sessions</a> <a href='/adapt'>Adaptation</a> "
                f"<a href='/device'>Device</a> "
                f"<span class='who'>{html.escape(user or '')}</span> {out}</nav>"
            )
        return (
            f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>bmc — {html.escape(title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<link rel='stylesheet' href='/static/ui.css'><script src='/static/ui.js' defer></script></head>"
            f"<body>{nav}<h1>{html.escape(title)}</h1>{body}</body></html>"
        )

    def _cells(self, folder: Path):
        try:
            db = sessiondb.connect(folder)
            try:
                return sessiondb.cells(db), sessiondb.sessions(db)
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise HttpError("500 Internal Server Error", f"{folder.name}: unreadable session database ({e})") from e

    def _session_summary(self, folder: Path, cells):
        """The folder's differential record and latest comment, read for this request alone."""
        db = sessiondb.connect(folder)
        try:
            return review.session_differential(db, cells), sessiondb.latest_note(db)
        finally:
            db.close()

    def _calibration(self, folder: Path) -> str:
        db = sessiondb.connect(folder)
        try:
            return review.calibration_statement(db)
        finally:
            db.close()

    def export_destinations(self) -> list[Path]:
        """Mounted USB sticks and disks under the export roots: the only places an export may go."""
        found = []
        for root in map(Path, self.export_roots):
            if not root.is_dir():
                continue
            for d in sorted(root.glob("*")) + sorted(root.glob("*/*")):
                if d.is_dir() and os.path.ismount(d) and os.access(d, os.W_OK):
                    found.append(d)
        return found

    def export(self, folder: Path, to: str, user: str) -> Response:
        from bmc.edge_app.service import export

        dests = {str(d): d for d in self.export_destinations()}
        if to not in dests:
            raise HttpError("400 Bad Request", "choose one of the mounted USB sticks or disks listed")
        try:
            target = export(folder, dests[to])
        except OSError as e:
            raise HttpError(
                "507 Insufficient Storage" if getattr(e, "errno", 0) == 28 else "500 Internal Server Error",
                f"the export did not finish: {e}",
            ) from e
        log.info("session %s exported to %s by %s", folder.name, target, user)
        return _redirect(f"/s/{urllib.parse.quote(folder.name)}/?exported=1")

    def sessions_page(self, user: str, csrf: str) -> str:
        from bmc.edge_app.service import session_dirs

        rows = []
        for d in reversed(session_dirs(self.storage)):
            try:
                cells, meta = self._cells(d)
            except HttpError:
                rows.append(f"<tr><td>{html.escape(d.name)}</td><td colspan='5' class='warn'>unreadable</td></tr>")
                continue
            record, _ = self._session_summary(d, cells)
            counted, pending = f"{record.total} {record.denominator}", record.waiting
            started = meta[0].started[:19].replace("T", " ") if meta else ""
            name = urllib.parse.quote(d.name)
            rows.append(
                f"<tr><td><a href='/s/{name}/'>{html.escape(d.name)}</a></td><td>{html.escape(started)}</td>"
                f"<td>{html.escape(', '.join(sorted({m.model_file for m in meta})))}</td><td>{counted}</td>"
                f"<td>{pending}</td><td>{html.escape(meta[-1].status if meta else '')}</td></tr>"
            )
        table = (
            (
                "<table><tr><th>session</th><th>started</th><th>model</th><th>counted</th><th>waiting for review</th>"
                "<th>status</th></tr>" + "".join(rows) + "</table>"
            )
            if rows
            else f"<p>No session in {html.escape(str(self.storage))} yet.</p>"
        )
        return self.page("Sessions", table, csrf, user)

    def session_page(self, folder: Path, user: str, csrf: str) -> str:
        cells, meta = self._cells(folder)
        record, note = self._session_summary(folder, cells)
        n, pending, unknown = record.total, record.waiting, record.unknown
        parents = report_mod.folder_parents(folder)
        levels = report_mod.levels_html(record, parents) if parents else ""  # a stage model: both levels
        name = urllib.parse.quote(folder.name)
        dests = self.export_destinations()
        comment = (
            (
                f"<p>Comment: <b>{html.escape(note.text)}</b> <span class='small'>({html.escape(note.author)}, "
                f"{html.escape(note.time[:16])})</span></p>"
                if note
                else ""
            )
            + f"<form method='post' action='/s/{name}/note'><input type='hidden' name='csrf' value='{csrf}'>"
            "<label>Comment on this session (smear, stain, what to recount) <input name='text' maxlength='500' "
            "size='60'></label> <button>Save</button><br><span class='small warn'>No patient names, numbers or "
            "dates of birth: the session is exported as it is.</span></form>"
        )
        export = (
            f"<form method='post' action='/s/{name}/export'><input type='hidden' name='csrf' value='{csrf}'>"
            "<label>Export to <select name='to'>"
            + "".join(f"<option>{html.escape(str(d))}</option>" for d in dests)
            + "</select></label> <button>Export</button></form>"
            if dests
            else "<p class='small'>Export: no USB stick or disk is mounted.</p>"
        )
        body = (
            f"<p>{'Blood' if record.specimen == 'blood' else 'Marrow'} differential: <b>{n}</b> "
            f"{record.denominator} counted, <b>{pending}</b> waiting for review"
            + (
                f", <b class='warn'>{unknown}</b> of them unlike any cell the model knows (first in review)"
                if unknown
                else ""
            )
            + f" (<a href='/s/{name}/review'>review them</a>) · <a href='/s/{name}/report'>report</a>"
            f" · <a href='/s/{name}/fhir'>FHIR DiagnosticReport</a> <span class='small'>(for the laboratory "
            "information system)</span></p>"
            + report_mod.differential_html(record)
            + (f"<p><b>{html.escape(statement)}.</b></p>" if (statement := self._calibration(folder)) else "")
            + "<p class='small'>95% limits: the exact binomial interval of each share (Rümke's table).</p>"
            + levels
            + "".join(
                f"<p class='small'>session started {html.escape(m.started[:19])}, {html.escape(m.status)}, model "
                f"{html.escape(m.model_file)}, source {html.escape(m.source)}</p>"
                for m in meta
            )
            + comment
            + export
        )
        return self.page(f"Session {folder.name}", body, csrf, user)

    def key_layout(self, labels) -> dict[str, str]:
        """Each class's review key: the configured one, else the next free digit 1-9 (a class left
        without a key is still a click away)."""
        out = {l: self.keys[l] for l in labels if l in self.keys}
        free = [str(d) for d in range(1, 10) if str(d) not in out.values()]
        for l in sorted(labels, key=_by_frequency):  # the commonest classes on the first digits
            if l not in out and free:
                out[l] = free.pop(0)
        return dict(sorted(out.items(), key=lambda kv: (not kv[1].isdigit(), kv[1])))

    REVIEW_PAGE = 200  # cells a review page shows at once

    def review_page(self, folder: Path, user: str, csrf: str, teach: bool = False, page: int = 1) -> str:
        cells, _ = self._cells(folder)
        # for adaptation: the cells that teach the head most, ten of each class the session found
        todo = review.teaching_queue(cells, 10) if teach else review.queue(cells)
        # the newest decision first: the one `b` takes back
        done = sorted((c for c in cells if c.status in ("reviewed", "rejected")), key=lambda c: c.reviewed_at)[::-1]
        name = urllib.parse.quote(folder.name)
        pages = max(1, -(-len(todo) // self.REVIEW_PAGE))
        page = min(max(page, 1), pages)
        shown = todo[(page - 1) * self.REVIEW_PAGE : page * self.REVIEW_PAGE]

        def card(c: review.ReviewedCell, decided: bool) -> str:
            top = "".join(f"<li>{html.escape(l)} {p:.2f}</li>" for l, p in c.top(3))
            buttons = "".join(
                f"<button name='label' value='{html.escape(l)}' data-key='{html.escape(k)}'>{html.escape(k)} "
                f"{html.escape(l)}</button>"
                for l, k in self.key_layout(c.labels).items()
            )
            state = (
                f"<p class='decided'>{html.escape(c.reviewed_label or '')} by {html.escape(c.reviewer)}</p>"
                f"<form method='post' action='/s/{name}/undo'><input type='hidden' name='csrf' value='{csrf}'>"
                f"<input type='hidden' name='cell' value='{c.id}'><button data-key='b'>b undo</button></form>"
                if decided
                else f"<form method='post' action='/s/{name}/decide'><input type='hidden' name='csrf' value='{csrf}'>"
                f"<input type='hidden' name='cell' value='{c.id}'>{buttons}"
                f"<button name='label' value='{html.escape(c.model_label)}' data-key='Enter'>Enter: "
                f"{html.escape(c.model_label)}</button><button name='label' value='rejected' data-key='x'>"
                "x not a cell</button></form>"
            )
            img = (
                f"<img src='/s/{name}/crop?id={c.id}' alt='cell {c.id}' width='160' height='160'>"
                if c.crop
                else "<div class='nocrop'>no crop saved</div>"
            )
            return (
                f"<div class='cell' tabindex='0' id='cell-{c.id}' data-cell='{c.id}'>{img}<p>"
                f"<a href='/s/{name}/cell/{c.id}'>cell {c.id}</a> · "
                f"{html.escape(c.flag or 'counted')}</p><ol>{top}</ol>{state}</div>"
            )

        switch = (
            f"<a href='/s/{name}/review'>the cells set aside</a>"
            if teach
            else f"<a href='/s/{name}/review?for=adapt'>the cells that teach adaptation most</a>"
        )
        query = "for=adapt&" if teach else ""
        showing = (
            f" Showing {(page - 1) * self.REVIEW_PAGE + 1}–{(page - 1) * self.REVIEW_PAGE + len(shown)} of {len(todo)}"
            + (f" · <a href='/s/{name}/review?{query}page={page - 1}'>previous</a>" if page > 1 else "")
            + (
                f" · <a href='/s/{name}/review?{query}page={page + 1}'>next {self.REVIEW_PAGE}</a>"
                if page < pages
                else ""
            )
            + "."
            if pages > 1
            else ""
        )
        body = (
            f"<p>{len(todo)} cells {'to name for adaptation' if teach else 'wait for review'} (show {switch}).{showing} "
            "Click a class, or select a cell and press its key, Enter "
            "(the model's call), x (not a cell) or b (undo the latest decision). Each decision is recorded under "
            "your name.</p>"
            f"<div class='grid' id='todo'>{''.join(card(c, False) for c in shown)}</div>"
            f"<h2>Decided ({len(done)}{', the latest 100 shown' if len(done) > 100 else ''})</h2>"
            f"<div class='grid' id='done'>{''.join(card(c, True) for c in done[:100])}</div>"
        )
        return self.page(f"Review — {folder.name}", body, csrf, user)

    # -- the live session -----------------------------------------------------------------------------
    def live_route(self, method: str, rest: list[str], form: dict, user: str, csrf: str):
        if self.live is None:
            if method == "GET" and rest == []:
                return Response(
                    self.page(
                        "Live",
                        "<p>No camera or source is set up for this screen, so no session can start here. Start the "
                        "screen with <code>--source</code> (a camera, a video or a folder of fields) or with the "
                        "device's <code>--config</code> (its <code>[camera]</code> source).</p>",
                        csrf,
                        user,
                    )
                )
            raise HttpError(
                "404 Not Found", "this screen was started without a camera or source (--config or --source)"
            )
        if method == "GET" and rest == []:
            return Response(self.live_page(user, csrf))
        if method == "GET" and rest == ["state"]:
            return Response(json.dumps(self.live.state()), ctype="application/json")
        if method == "GET" and rest == ["stream"]:
            return Stream(self._mjpeg(), "multipart/x-mixed-replace; boundary=frame")
        if method == "POST" and rest == ["start"]:
            try:
                target = int(form.get("target") or 0)
            except ValueError:
                raise HttpError("400 Bad Request", "the target is a number of cells") from None
            if not 0 <= target <= 100_000:
                raise HttpError("400 Bad Request", "the target is between 0 (none) and 100000 cells")
            try:
                folder = self.live.start(target)
            except Exception as e:  # noqa: BLE001 - a camera that will not open, a model that will not load
                raise HttpError("409 Conflict", f"the session did not start: {e}") from e
            log.info("live session %s started by %s", folder.name, user)
            return _redirect("/live")
        if method == "POST" and rest in (["pause"], ["resume"]):
            self.live.pause(rest == ["pause"])
            return _redirect("/live")
        if method == "POST" and rest == ["stop"]:
            self.live.stop()
            log.info("live session stopped by %s", user)
            return _redirect("/live")
        raise HttpError("404 Not Found", "no such page")

    def _mjpeg(self):
        for captured, jpeg in self.live.frames():
            yield (
                b"--frame\r\nContent-Type: image/jpeg\r\n"
                + f"X-Frame-Time: {captured:.6f}\r\n".encode()
                + f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                + jpeg
                + b"\r\n"
            )

    def live_page(self, user: str, csrf: str) -> str:
        st = self.live.state()
        running = st["state"] in ("running", "paused")

        def button(action: str, text: str, extra: str = "") -> str:
            return (
                f"<form method='post' action='/live/{action}' class='inline'><input type='hidden' name='csrf' "
                f"value='{csrf}'>{extra}<button>{text}</button></form>"
            )

        controls = (
            (button("resume", "Resume") if st["state"] == "paused" else button("pause", "Pause"))
            + button("stop", "Stop")
            if running
            else button(
                "start",
                "Start a session",
                "<label>stop at <input name='target' type='number' min='0' max='100000' value='200'> leukocytes "
                "(0: no target)</label> ",
            )
        )
        last = (
            f" The last one, <a href='/s/{urllib.parse.quote(st['folder'])}/'>{html.escape(st['folder'])}</a>, "
            f"ended {html.escape(st['state'])}: its differential and review are there."
            if st.get("folder") and st["state"] not in ("idle", "running", "paused")
            else ""
        )
        view = (
            "<img id='live' src='/live/stream' alt='the microscope field, live' width='640'>"
            if running
            else f"<p>No session is running.{last}</p>"
        )
        error = f"<p class='warn'>{html.escape(st['error'])}</p>" if st.get("error") else ""
        return self.page(
            "Live",
            f"{error}<p>{controls}</p><div class='live'>{view}<div id='state' "
            f"data-live='1'>{html.escape(json.dumps(st))}</div></div>",
            csrf,
            user,
        )

    # -- adaptation ---------------------------------------------------------------------------------
    def _base_model(self):
        from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

        return CellClassifier(self.model or DEFAULT_MODEL, orientations=1)

    def adapt_page(self, user: str, csrf: str, result_html: str = "") -> str:
        from bmc.edge_app.active import active_model, adapted_models
        from bmc.edge_app.service import session_dirs

        rows = []
        for d in reversed(session_dirs(self.storage)):
            try:
                cells, _ = self._cells(d)
            except HttpError:
                continue
            n = sum(c.status in ("reviewed",) for c in cells)
            rows.append(
                f"<tr><td><input type='checkbox' name='session' value='{html.escape(d.name)}' "
                f"{'checked' if n else 'disabled'}></td><td>{html.escape(d.name)}</td><td class='num'>{n}</td></tr>"
            )
        active = active_model(self.storage)
        models = []
        for m in adapted_models(self.storage):
            try:
                card = read_card(m)
                a = card.get("adaptation", {})
                cv = a.get("cross_validation", {})
                what = (
                    f"{a.get('date', '?')[:16]}, {a.get('cells', '?')} cells by {', '.join(a.get('reviewers', []))}; "
                    f"balanced accuracy {cv['shipped']['balanced_accuracy']:.3f} → "
                    f"{cv['adapted']['balanced_accuracy']:.3f}"
                )
            except (OSError, ValueError, KeyError, TypeError):
                what = "unreadable card"
            is_active = active is not None and active.name == m.name
            button = (
                "<b>active</b>"
                if is_active
                else f"<form method='post' action='/adapt/activate' class='inline'><input type='hidden' name='csrf' "
                f"value='{csrf}'><button name='model' value='{html.escape(m.name)}'>Make active</button></form>"
            )
            models.append(f"<tr><td>{html.escape(m.stem)}</td><td>{html.escape(what)}</td><td>{button}</td></tr>")
        shipped = (
            "<b>active</b>"
            if active is None
            else f"<form method='post' action='/adapt/activate' class='inline'><input type='hidden' name='csrf' "
            f"value='{csrf}'><button name='model' value=''>Go back to the shipped model</button></form>"
        )
        body = (
            result_html + "<h2>Adapt to this microscope</h2><p>The model learns a new last layer from the cells people "
            "reviewed, checked by cross-validation against the shipped one; it is refused unless better. "
            "Review 5-10 cells of each class first.</p>"
            f"<form method='post' action='/adapt'><input type='hidden' name='csrf' value='{csrf}'>"
            "<table><tr><th></th><th>session</th><th>cells named by a reviewer</th></tr>"
            + "".join(rows)
            + "</table><label>Name of the new model <input name='name' required pattern='[A-Za-z0-9_-]{1,40}' "
            "maxlength='40' value='lab'></label> <button>Adapt</button></form>"
            "<h2>Models</h2><table><tr><th>model</th><th>learnt</th><th></th></tr>"
            f"<tr><td>shipped</td><td>{html.escape(self._base_model().path.name)}</td><td>{shipped}</td></tr>"
            + "".join(models)
            + "</table><p class='small'>The service counts with the active model from its next "
            "session on.</p>"
        )
        return self.page("Adaptation", body, csrf, user)

    def run_adapt(self, form: dict, user: str, csrf: str) -> str:
        import re

        from bmc.edge_app import adapt
        from bmc.edge_app.active import models_dir

        name = (form.get("name") or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
            raise HttpError("400 Bad Request", "a model name is 1-40 letters, digits, - or _")
        chosen = [self.session_folder(n) for n in self._many(form, "session")]
        if not chosen:
            raise HttpError("400 Bad Request", "choose at least one session with reviewed cells")
        clf = self._base_model()
        try:
            guard, reviewed, r = adapt.prepare(chosen, clf)
        except adapt.AdaptError as e:
            return self.adapt_page(user, csrf, f"<p class='warn'>Not adapted: {html.escape(str(e))}</p>")
        cv = r.cross_validation
        rows = "".join(
            f"<tr><td>{html.escape(l)}</td><td class='num'>{r.cells_per_class.get(l, 0)}</td>"
            f"<td class='num'>{cv['shipped']['recall'][l]:.2f}</td><td class='num'>"
            f"{cv['adapted']['recall'][l]:.2f}</td></tr>"
            for l in r.labels
            if l in cv["shipped"]["recall"]
        )
        table = (
            "<table><tr><th>class</th><th>reviewed cells</th><th>shipped</th><th>adapted</th></tr>"
            + rows
            + f"<tr><td>balanced accuracy</td><td></td><td class='num'>{cv['shipped']['balanced_accuracy']:.3f}</td>"
            f"<td class='num'>{cv['adapted']['balanced_accuracy']:.3f}</td></tr></table>"
            f"<p class='small'>Recall of each class on reviewed cells neither head was fitted on; training classes "
            f"held out: {r.guard['shipped_accuracy']:.3f} shipped, {r.guard['adapted_accuracy']:.3f} adapted.</p>"
        )
        advice = ("<p>More reviewed cells would help: " + html.escape("; ".join(r.advice)) + "</p>") if r.advice else ""
        if not r.accepted:
            return self.adapt_page(
                user,
                csrf,
                "<p class='warn'>Refused, nothing written: "
                + html.escape("; ".join(r.reasons))
                + f"</p>{table}{advice}",
            )
        try:
            path = adapt.write_model(r, reviewed, clf, guard, models_dir(self.storage), name)
        except adapt.AdaptError as e:
            return self.adapt_page(user, csrf, f"<p class='warn'>{html.escape(str(e))}</p>")
        log.info("adapted model %s written by %s", path, user)
        return self.adapt_page(
            user,
            csrf,
            f"<p><b>{html.escape(path.stem)}</b> written: better than the shipped model "
            f"on held-out reviewed cells. Make it active below to count with it.</p>{table}{advice}",
        )

    def activate(self, form: dict, user: str) -> Response:
        from bmc.edge_app.active import ActiveModelError, set_active

        name = form.get("model", "")
        try:
            set_active(self.storage, name or None, user)
        except ActiveModelError as e:
            raise HttpError("400 Bad Request", str(e)) from e
        log.info("active model set to %s by %s", name or "the shipped one", user)
        return _redirect("/adapt")

    @staticmethod
    def _many(form: dict, key: str) -> list[str]:
        return [v for v in form.get(key, "").split("\n") if v]

    def device_page(self, user: str, csrf: str) -> str:
        from bmc.edge_app.service import doctor

        have, wrong = doctor(model_path=str(self.model) if self.model else None)
        body = (
            "<ul>"
            + "".join(f"<li>{html.escape(h)}</li>" for h in have)
            + "".join(f"<li class='warn'>PROBLEM: {html.escape(w)}</li>" for w in wrong)
            + "</ul>"
        )
        return self.page("Device", body, csrf, user)


def stop_from_another_thread(server, thread, timeout: float = 10.0) -> None:
    """Stop a waitress ``server`` whose loop runs in ``thread``: every socket of the loop (the
    listening one, the trigger, and the connections a browser keeps alive) is closed in the loop's
    own thread (through its trigger), so the loop never selects on a socket closed under it, and
    it ends as its map empties."""

    def close_all():
        # the server's own close closes its trigger too: each descriptor is closed exactly once (a
        # second close of a number could close another socket that has reused it meanwhile)
        others = [d for d in list(server._map.values()) if d is not server and d is not server.trigger]
        server.close()
        for dispatcher in others:
            try:
                dispatcher.close()
            except OSError:  # a connection the client already dropped
                pass

    try:
        server.trigger.pull_trigger(close_all)
    except OSError:
        # the loop was already awake (a worker's pull) and ran close_all, which closed the trigger,
        # between the thunk's queueing and this pull's write: the close is done, the write is moot
        pass
    thread.join(timeout)
    server.task_dispatcher.shutdown()


def serve(app: UiApp, host: str, port: int, echo=print, ready=None):
    """Serve ``app`` with waitress (pure Python, threads) until interrupted."""
    import logging

    from waitress import create_server

    # a review page asks for its crops at once: more requests wait than threads serve for a moment,
    # which waitress reports as one "Task queue depth" warning a request; a queue is no fault here
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        server = create_server(app, host=host, port=port, threads=8, ident="bmc", clear_untrusted_proxy_headers=True)
    except OSError as e:  # the port taken, or an address this computer does not have
        raise UiError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (another program there? --listen HOST:PORT)"
        ) from None
    bound = server.effective_port
    app.port = bound
    echo(
        f"bmc screen on http://{host if ':' not in host else f'[{host}]'}:{bound}/ "
        + ("(sign-in required)" if app.sign_in else "(this computer only)")
    )
    if ready:
        ready(server)
    try:
        server.run()
    finally:
        server.close()

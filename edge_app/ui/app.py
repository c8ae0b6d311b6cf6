"""``bmc edge ui``: the technician's screen, a small web application served by the device.

Server-rendered pages with a little plain JavaScript, no CDN and no build step: it works with no
internet. It renders what the session databases and the report code already know (the counts come
from :mod:`bmc.edge_app.review`, the same functions as ``report.html`` and ``cells.csv``), and every
decision is the same audited row ``bmc edge review`` writes, under the signed-in name.

Here: the application's shared state, the route table, and the front door every request goes
through (the loopback check, sign-in, the CSRF token). The pages are one module each under
:mod:`bmc.edge_app.ui.pages`; the request, responses, routing and escaping HTML in
:mod:`bmc.edge_app.ui.web`.

Safe on a clinic network (STYLE.md, "Servers on the device"):

* it listens on 127.0.0.1 unless told otherwise; any other address needs a password set on the
  device first (``bmc edge ui --set-password``), and then every client signs in, a local one too;
* on loopback only, requests must name a loopback host (no DNS rebinding);
* a random session token in an HttpOnly, SameSite=Strict cookie, a CSRF token on every change,
  failed sign-ins limited per address;
* sessions are looked up by name among the storage folder's sessions and files by cell id,
  through the same containment check as the report: no request path reaches a file outside it;
* per-request state lives in the :class:`~bmc.edge_app.ui.web.Request`; what the request threads
  share (the sign-ins, the map makers) is locked;
* errors are a plain page; details go to the log, never a password or token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from http import cookies
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from bmc.edge_app import review, sessiondb
from bmc.edge_app.sessiondb import Note, ReviewedCell, SessionRecord
from bmc.edge_app.ui.auth import RateLimit, Sessions, verify_password
from bmc.edge_app.ui.pages import adapt, cell, device, live, sessions
from bmc.edge_app.ui.pages import review as review_pages
from bmc.edge_app.ui.pages.review import BY_FREQUENCY, key_layout
from bmc.edge_app.ui.web import CSP, Html, HttpError, Request, Response, Router, Stream, html, layout, redirect
from bmc.errors import BmcError

if TYPE_CHECKING:
    from bmc.edge_app.activation_maps import ActivationMaps
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.differential import DifferentialCount
    from bmc.edge_app.ui.live import LiveRunner

__all__ = ["BY_FREQUENCY", "CSP", "HttpError", "UiApp", "UiError", "is_loopback", "serve", "stop_from_another_thread"]

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "bmc_ui"


class UiError(BmcError, RuntimeError):
    """The screen cannot start as asked (its address taken, say); the message says what and where."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def routes() -> Router:
    """Every page and action of the screen."""
    r = Router()
    r.add("GET", "/", sessions.sessions_page)
    r.add("GET", "/device", device.device_page)
    r.add("GET", "/live", live.live_page)
    r.add("GET", "/live/state", live.state)
    r.add("GET", "/live/stream", live.stream)
    r.add("POST", "/live/start", live.start)
    r.add("POST", "/live/pause", live.pause)
    r.add("POST", "/live/resume", live.pause)
    r.add("POST", "/live/stop", live.stop)
    r.add("GET", "/adapt", adapt.adapt_page)
    r.add("POST", "/adapt", adapt.run_adapt)
    r.add("POST", "/adapt/activate", adapt.activate)
    r.add("GET", "/s/{session}", sessions.session_page)
    r.add("GET", "/s/{session}/report", sessions.report)
    r.add("GET", "/s/{session}/fhir", sessions.fhir_export)
    r.add("POST", "/s/{session}/fhir", sessions.fhir_export)
    r.add("POST", "/s/{session}/note", sessions.note)
    r.add("POST", "/s/{session}/export", sessions.export)
    r.add("GET", "/s/{session}/review", review_pages.review_page)
    r.add("POST", "/s/{session}/decide", review_pages.decide)
    r.add("POST", "/s/{session}/undo", review_pages.decide)
    r.add("GET", "/s/{session}/crop", cell.crop)
    r.add("GET", "/s/{session}/cell/{cell}", cell.cell_page)
    r.add("GET", "/s/{session}/cell/{cell}/map", cell.cell_map)
    return r


def _session_of(path: str) -> str | None:
    """The session folder a request's path names (``/s/NAME/…``), or None."""
    parts = path.split("/")
    return unquote(parts[2]) if len(parts) > 2 and parts[1] == "s" and parts[2] else None


class UiApp:
    """The WSGI application. ``sign_in``: every client must sign in (the server listens beyond
    loopback); else the local user is taken as signed in, and ``user`` names who decides."""

    REVIEW_PAGE = 200  # cells a review page shows at once

    def __init__(
        self,
        storage: str | Path,
        password_hash: str | None,
        sign_in: bool,
        user: str = "local",
        port: int = 0,
        model: str | Path | None = None,
        live: LiveRunner | None = None,
        export_roots: tuple[str, ...] = ("/media", "/mnt", "/run/media"),
        keys: Mapping[str, str] | None = None,
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
        self.router = routes()
        # shared by every request thread: the map makers (each model's, made once, behind a lock);
        # everything else a request computes stays in the request
        self._maps_lock = threading.Lock()
        self._map_makers: dict[Path, tuple[CellClassifier, ActivationMaps]] = {}

    # -- WSGI -------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            resp = self.handle(environ)
        except HttpError as e:
            onwards = html("<p><a href='{h}'>{t}</a></p>", h=e.link[0], t=e.link[1]) if e.link else Html("")
            resp = Response(self.error_page(e.status, html("<p>{m}</p>{o}", m=e.message, o=onwards)), e.status)
        except sessiondb.UnreadableSession as e:  # any page of a damaged folder: which one, and why
            log.warning("%s: %s", e.path, e.why)
            resp = self._unreadable(e.path.parent.name, e.why)
        except sqlite3.DatabaseError as e:  # tables there, pages damaged: found deeper, in a query
            name = _session_of(str(environ.get("PATH_INFO", "")))
            if name is None:
                log.exception("error serving %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
                resp = self._unreadable("", f"a session database is damaged ({e})")
            else:
                log.warning("%s: unreadable session database (%s)", name, e)
                resp = self._unreadable(name, f"unreadable session database ({e})")
        except Exception:  # noqa: BLE001 - a plain page for the browser, the details for the log
            log.exception("error serving %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            resp = Response(
                self.error_page("Error", Html("<p>Something went wrong; the device's log has the details.</p>")),
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

    def _unreadable(self, name: str, why: str) -> Response:
        said = html("<p>{m}</p>", m=f"{name}: {why}" if name else why)
        return Response(self.error_page("Unreadable session", said), "500 Internal Server Error")

    def handle(self, environ: dict[str, Any]) -> Response:
        """The front door: the host check, the static files, sign-in and the CSRF token, then the page."""
        req = Request.read(environ)
        if not self.sign_in:
            host = str(environ.get("HTTP_HOST") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                raise HttpError("403 Forbidden", "this screen answers to 127.0.0.1 or localhost only")
        if req.path.startswith("/static/"):
            return self.static(req.path[len("/static/") :])
        token = self._token(environ)
        who = self.sessions.get(token)
        new_cookie = []
        if who is None and not self.sign_in:  # loopback: the local user, with a session for the CSRF token
            token = self.sessions.create(self.user)
            who = self.sessions.get(token)
            new_cookie = [self._cookie(token)]
        if req.path == "/login":
            return self.login(req)
        if who is None:
            if req.method == "POST":
                raise HttpError("403 Forbidden", "sign in first")
            return redirect("/login")
        user, csrf = who
        if req.method == "POST" and req.form.get("csrf") != csrf:
            raise HttpError("403 Forbidden", "the form is out of date (or did not come from this screen); reload")
        req = dataclasses.replace(req, user=user, csrf=csrf)
        if req.method == "POST" and req.path == "/logout":
            self.sessions.end(self._token(environ))
            return redirect("/login" if self.sign_in else "/", [self._cookie("", 0)])
        handler, params = self.router.match(req)
        resp = handler(self, dataclasses.replace(req, params=params))
        resp.headers += new_cookie
        return resp

    def _cookie(self, token: str, max_age: int | None = None) -> tuple[str, str]:
        extra = f"; Max-Age={max_age}" if max_age is not None else ""
        return "Set-Cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{extra}"

    @staticmethod
    def _token(environ: Mapping[str, Any]) -> str | None:
        jar = cookies.SimpleCookie(str(environ.get("HTTP_COOKIE", "")))
        return jar[COOKIE].value if COOKIE in jar else None

    def static(self, name: str) -> Response:
        files = {
            "ui.css": "text/css; charset=utf-8",
            "ui.js": "text/javascript; charset=utf-8",
            "icon.svg": "image/svg+xml",
        }
        if name not in files:  # a fixed list: no path from the request reaches the file system
            raise HttpError("404 Not Found", "no such file")
        return Response((STATIC / name).read_bytes(), ctype=files[name], headers=[])

    def login(self, req: Request) -> Response:
        if not self.sign_in:
            return redirect("/")
        client = str(req.environ.get("REMOTE_ADDR", "?"))
        message = Html("")
        if req.method == "POST":
            attempt = self.limit.attempt(client)
            if attempt is None:
                raise HttpError("429 Too Many Requests", "too many failed sign-ins from this address; wait 5 minutes")
            name = (req.form.get("user") or "").strip()[:40]
            if name and verify_password(req.form.get("password", ""), self.password_hash or ""):
                self.limit.succeeded(client, attempt)
                token = self.sessions.create(name)
                log.info("signed in: %s from %s", name, client)
                return redirect("/", [self._cookie(token)])
            log.warning("failed sign-in from %s", client)
            message = Html("<p class='warn'>Wrong name or password.</p>")
        body = html(
            "{message}<form method='post' action='/login' class='login'>"
            "<label>Your name (recorded with each decision) <input name='user' required maxlength='40' "
            "autocomplete='username'></label><label>Device password <input name='password' type='password' "
            "required autocomplete='current-password'></label><button>Sign in</button></form>",
            message=message,
        )
        return Response(layout("Sign in", body, None, None, self.sign_in))

    # -- what pages share ---------------------------------------------------------------------------
    def page(self, title: str, body: Html, req: Request) -> Response:
        """A page for the signed-in user of ``req``."""
        return Response(layout(title, body, req.user, req.csrf, self.sign_in))

    def error_page(self, title: str, body: Html) -> Html:
        return layout(title, body, None, None, self.sign_in, links=True)

    def session_folder(self, name: str) -> Path:
        """The session folder called ``name`` among the storage folder's sessions, or 404."""
        from bmc.edge_app.service import session_dirs

        found = {d.name: d for d in session_dirs(self.storage)}
        if name not in found:
            raise HttpError("404 Not Found", "no such session")
        return found[name]

    def session_data(self, folder: Path) -> tuple[list[ReviewedCell], list[SessionRecord]]:
        """A folder's cells and sessions, read for this request alone."""
        try:
            db = sessiondb.connect(folder)
            try:
                return sessiondb.cells(db), sessiondb.sessions(db)
            finally:
                db.close()
        except sessiondb.UnreadableSession:
            raise  # one page for a damaged folder, whichever page asked (__call__)
        except sqlite3.DatabaseError as e:
            raise sessiondb.UnreadableSession(sessiondb.path_of(folder), f"unreadable session database ({e})") from e

    def summary(self, folder: Path, cells: list[ReviewedCell]) -> tuple[DifferentialCount, list[Note]]:
        """The folder's differential record and its comments (oldest first; the last is the
        session's comment), read for this request alone."""
        db = sessiondb.connect(folder)
        try:
            return review.session_differential(db, cells), sessiondb.notes(db)
        finally:
            db.close()

    def calibration(self, folder: Path) -> str:
        db = sessiondb.connect(folder)
        try:
            return review.calibration_statement(db)
        finally:
            db.close()

    def key_layout(self, labels: Iterable[str]) -> dict[str, str]:
        return key_layout(self.keys, labels)

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

    def counting_model(self) -> Path:
        """The model file this screen's sessions count with: the one given, else the device's own
        on the runtime the Live page takes (:func:`bmc.edge_app.factory.model_file`)."""
        from bmc.edge_app.config import ModelConfig
        from bmc.edge_app.factory import model_file

        return Path(self.model) if self.model else model_file(self.live.model_config if self.live else ModelConfig())

    def base_model(self) -> CellClassifier:
        from bmc.edge_app.classifier import CellClassifier

        return CellClassifier(self.counting_model(), orientations=1)

    def map_maker(self) -> tuple[CellClassifier, ActivationMaps]:
        """The counting model (the active adapted one, else the configured or shipped one) and its maps."""
        from bmc.edge_app.activation_maps import ActivationMaps
        from bmc.edge_app.active import active_model
        from bmc.edge_app.classifier import CellClassifier

        path = Path(active_model(self.storage) or self.counting_model())
        with self._maps_lock:  # one map maker per model, made once however many requests ask at once
            if path not in self._map_makers:
                clf = CellClassifier(path, threads=1, orientations=1)
                self._map_makers[path] = (clf, ActivationMaps(clf))  # its interpreter has a lock of its own
            return self._map_makers[path]


def stop_from_another_thread(server: Any, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Stop a waitress ``server`` whose loop runs in ``thread``: every socket of the loop (the
    listening one, the trigger, and the connections a browser keeps alive) is closed in the loop's
    own thread (through its trigger), so the loop never selects on a socket closed under it, and
    it ends as its map empties."""

    def close_all() -> None:
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


def serve(
    app: UiApp,
    host: str,
    port: int,
    echo: Callable[[str], None] = print,
    ready: Callable[[Any], None] | None = None,
) -> None:
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

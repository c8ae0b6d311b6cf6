"""The screen's small web layer: a request read once, responses, a route table, and HTML that
escapes what it is given.

* :class:`Request` — method, path segments, query and form fields parsed once, the signed-in user
  and the CSRF token of this request alone (nothing per request lives on the shared application);
* :class:`Router` — ``("GET", "/s/{session}/cell/{cell}")`` patterns to handlers;
* :func:`html` — a template whose every field is escaped unless it is already :class:`Html` (a
  fragment made by :func:`html` itself), so that no page writes ``html.escape`` by hand and no text
  from a session (a source name, a comment) reaches the page unescaped.
"""

from __future__ import annotations

import dataclasses
import html as _html
import string
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bmc.edge_app.activation_maps import ActivationMaps
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.differential import DifferentialCount
    from bmc.edge_app.sessiondb import Note, ReviewedCell, SessionRecord
    from bmc.edge_app.ui.live import LiveRunner

CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
MAX_BODY = 64 * 1024


class Html(str):
    """A fragment of HTML that is already safe: :func:`html` puts it in as it is."""

    @staticmethod
    def join(parts: Iterable[Html | str], sep: str = "") -> Html:
        """Fragments one after the other; a plain string among them is escaped."""
        return Html(sep.join(p if isinstance(p, Html) else _html.escape(p) for p in parts))


class _Escaping(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Html):
            return str(value)
        return _html.escape(super().format_field(value, format_spec))


_FORMATTER = _Escaping()


def html(template: str, /, **values: Any) -> Html:
    """``template`` (``str.format`` syntax) with each value escaped, unless it is :class:`Html`."""
    return Html(_FORMATTER.vformat(template, (), values))


def quote(segment: str) -> str:
    """A path segment for a link (a session folder's name)."""
    return urllib.parse.quote(segment)


class HttpError(Exception):
    """An answer other than the page asked for: its status and a line for the person."""

    def __init__(self, status: str, message: str, link: tuple[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.link = status, message, link  # link: (href, text) onwards


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


class Stream(Response):
    """A streamed response (the live view's MJPEG): parts as they come, no length."""

    def __init__(self, parts: Iterator[bytes], ctype: str):
        super().__init__(b"", ctype=ctype)
        self.parts = parts


def redirect(to: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(b"", "303 See Other", headers=[("Location", to), *(headers or [])])


@dataclasses.dataclass(frozen=True)
class Request:
    """One request, read once: everything a page needs of it, and nothing shared."""

    method: str
    path: str
    query: Mapping[str, str]
    form: Mapping[str, str]
    environ: Mapping[str, Any]
    user: str = ""
    csrf: str = ""
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, environ: Mapping[str, Any]) -> Request:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        return cls(
            method,
            str(environ.get("PATH_INFO", "/") or "/"),
            query,
            _form(environ) if method == "POST" else {},
            environ,
        )

    def many(self, key: str) -> list[str]:
        """A form field sent several times (several sessions ticked)."""
        return [v for v in self.form.get(key, "").split("\n") if v]

    @property
    def wants_json(self) -> bool:
        return "application/json" in str(self.environ.get("HTTP_ACCEPT", ""))


def _form(environ: Mapping[str, Any]) -> dict[str, str]:
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


Handler = Callable[["Screen", Request], Response]  # (the application, the request)


class Router:
    """``(method, pattern)`` → handler; a pattern's ``{name}`` segment matches one path segment,
    handed to the handler as ``request.params[name]``."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, list[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, [p for p in pattern.split("/") if p], handler))

    def match(self, request: Request) -> tuple[Handler, dict[str, str]]:
        parts = [p for p in request.path.split("/") if p]  # PATH_INFO is already decoded
        allowed = False
        for method, pattern, handler in self._routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            if method == request.method:
                return handler, params
            allowed = True
        if allowed:
            raise HttpError("405 Method Not Allowed", f"{request.method} is not answered here")
        raise HttpError("404 Not Found", "no such page")


def _match(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params = {}
    for p, got in zip(pattern, parts):
        if p.startswith("{") and p.endswith("}"):
            params[p[1:-1]] = got
        elif p != got:
            return None
    return params


def hidden_csrf(csrf: str) -> Html:
    return html("<input type='hidden' name='csrf' value='{csrf}'>", csrf=csrf)


def post_button(action: str, csrf: str, label: str, inner: Html = Html(""), cls: str = "inline") -> Html:
    """A one-button form that posts to ``action`` with the request's CSRF token."""
    return html(
        "<form method='post' action='{action}' class='{cls}'>{csrf}{inner}<button>{label}</button></form>",
        action=action,
        cls=cls,
        csrf=hidden_csrf(csrf),
        inner=inner,
        label=label,
    )


def layout(title: str, body: Html, user: str | None, csrf: str | None, sign_out: bool, links: bool = False) -> Html:
    """A page of the screen: its navigation for a signed-in user (``csrf``), the links alone for an
    error page (``links``: a way back, nothing that needs a session)."""
    nav = Html("")
    menu = Html(
        "<a href='/live'>Live</a> <a href='/'>Sessions</a> <a href='/adapt'>Adaptation</a> <a href='/device'>Device</a>"
    )
    if links:
        nav = html("<nav>{menu}</nav>", menu=menu)
    if csrf is not None:
        out = post_button("/logout", csrf, "Sign out") if sign_out else Html("")
        nav = html("<nav>{menu} <span class='who'>{user}</span> {out}</nav>", menu=menu, user=user or "", out=out)
    return html(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>bmc — {title}</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='/static/icon.svg'><link rel='stylesheet' href='/static/ui.css'><script src='/static/ui.js' defer></script></head>"
        "<body>{nav}<h1>{title}</h1>{body}</body></html>",
        title=title,
        nav=nav,
        body=body,
    )


class Screen(Protocol):
    """What a page may ask of the application (:class:`bmc.edge_app.ui.app.UiApp`): its settings,
    the session folders and what they hold, read for the one request, and the page layout."""

    storage: Path
    model: str | Path | None
    live: LiveRunner | None
    keys: dict[str, str]
    REVIEW_PAGE: int

    def page(self, title: str, body: Html, req: Request) -> Response: ...

    def session_folder(self, name: str) -> Path: ...

    def session_data(self, folder: Path) -> tuple[list[ReviewedCell], list[SessionRecord]]: ...

    def summary(self, folder: Path, cells: list[ReviewedCell]) -> tuple[DifferentialCount, list[Note]]: ...

    def calibration(self, folder: Path) -> str: ...

    def export_destinations(self) -> list[Path]: ...

    def base_model(self) -> CellClassifier: ...

    def map_maker(self) -> tuple[CellClassifier, ActivationMaps]: ...

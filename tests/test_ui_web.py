"""The screen's web layer (``edge_app/ui/web.py``): its escaping HTML, its routes and its request."""

from __future__ import annotations

import ast
import io

import pytest

from bmc.edge_app.ui import web
from bmc.edge_app.ui.app import routes

from conftest import ROOT


def test_html_escapes_every_value_but_a_fragment_it_made():
    name = "<script>alert(1)</script> & 'x'"
    page = web.html("<p title='{t}'>{n}</p>{frag}", t=name, n=name, frag=web.html("<b>{x}</b>", x="<i>"))
    assert "<script>" not in page and "&lt;script&gt;" in page and "&#x27;x&#x27;" in page
    assert page.endswith("<b>&lt;i&gt;</b>")  # the fragment as it was made, its own value escaped
    assert web.html("{p:.2f}", p=0.12345) == "0.12"
    assert web.Html.join(["<a>", web.Html("<b>")]) == "&lt;a&gt;<b>"


def test_no_page_escapes_by_hand():
    """Every page writes HTML through web.html: no ``html.escape`` call, no f-string of markup."""
    found = []
    for path in sorted((ROOT / "edge_app" / "ui").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "escape" and path.name != "web.py":
                found.append(f"{path.name}:{node.lineno} calls escape")
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if "<" in text and ">" in text:
                    found.append(f"{path.name}:{node.lineno} builds markup in an f-string")
    assert not found, "\n".join(found)


def _req(method: str, path: str) -> web.Request:
    return web.Request.read({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "a=1&a=2&b=x"})


def test_the_route_table_finds_each_page_and_its_parameters():
    r = routes()
    handler, params = r.match(_req("GET", "/s/20261201-0900/cell/17/map"))
    assert handler.__name__ == "cell_map" and params == {"session": "20261201-0900", "cell": "17"}
    assert r.match(_req("GET", "/s/x/"))[0].__name__ == "session_page"  # a trailing slash is the same page
    with pytest.raises(web.HttpError, match="no such page") as e:
        r.match(_req("GET", "/s/x/nothing"))
    assert e.value.status.startswith("404")
    with pytest.raises(web.HttpError) as e:
        r.match(_req("GET", "/s/x/decide"))  # a change is a POST
    assert e.value.status.startswith("405")


def test_a_request_is_read_once_with_its_query_and_form():
    body = b"csrf=t&session=a&session=b&label=%3Cx%3E"
    req = web.Request.read(
        {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/adapt",
            "QUERY_STRING": "page=2&page=3",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
    )
    assert req.query == {"page": "3"} and req.form["label"] == "<x>" and req.many("session") == ["a", "b"]
    big = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_LENGTH": str(web.MAX_BODY + 1),
        "wsgi.input": io.BytesIO(),
    }
    with pytest.raises(web.HttpError, match="too large"):
        web.Request.read(big)

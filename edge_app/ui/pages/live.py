"""The live session: the microscope field as the device sees it, its count, and start, pause and
stop. Without a camera or source set up, a page that says so."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bmc.edge_app.ui.web import Html, HttpError, Request, Response, Screen, Stream, html, post_button, quote, redirect

if TYPE_CHECKING:
    from bmc.edge_app.ui.live import LiveRunner

log = logging.getLogger("bmc.edge_app.ui.app")

# how the last session ended, as the page says it
ENDED = {
    "finished": "finished",
    "stopped": "was stopped",
    "short of target": "ended short of its target (the source ran out): the count is short",
    "disk-full": "stopped: the disk is full",
}

NO_SOURCE = Html(
    "<p>No camera or source is set up for this screen, so no session can start here. Start the "
    "screen with <code>--source</code> (a camera, a video or a folder of fields) or with the "
    "device's <code>--config</code> (its <code>[camera]</code> source).</p>"
)


def _runner(app: Screen) -> LiveRunner:
    if app.live is None:
        raise HttpError("404 Not Found", "this screen was started without a camera or source (--config or --source)")
    return app.live


def live_page(app: Screen, req: Request) -> Response:
    if app.live is None:
        return app.page("Live", NO_SOURCE, req)
    st = app.live.state()
    running = st["state"] in ("running", "paused")
    if running:
        controls = (
            post_button("/live/resume", req.csrf, "Resume")
            if st["state"] == "paused"
            else post_button("/live/pause", req.csrf, "Pause")
        ) + post_button("/live/stop", req.csrf, "Stop")
    else:
        controls = post_button(
            "/live/start",
            req.csrf,
            "Start a session",
            Html(
                "<label>stop at <input name='target' type='number' min='0' max='100000' value='200'> leukocytes "
                "(0: no target)</label> "
            ),
        )
    last = (
        html(
            " The last one, <a href='/s/{link}/'>{name}</a>, {ended}: its differential and review are there.",
            link=quote(st["folder"]),
            name=st["folder"],
            ended=ENDED.get(st["state"], f"ended ({st['state']})"),
        )
        if st.get("folder") and st["state"] not in ("idle", "running", "paused")
        else Html("")
    )
    view = (
        Html("<img id='live' src='/live/stream' alt='the microscope field, live' width='640'>")
        if running
        else html("<p>No session is running.{last}</p>", last=last)
    )
    body = html(
        "{error}<p>{controls}</p><div class='live'>{view}<div id='state' data-live='1'>{state}</div></div>",
        error=html("<p class='warn'>{e}</p>", e=st["error"]) if st.get("error") else Html(""),
        controls=Html(controls),
        view=view,
        state=json.dumps(st),
    )
    return app.page("Live", body, req)


def state(app: Screen, req: Request) -> Response:
    return Response(json.dumps(_runner(app).state()), ctype="application/json")


def stream(app: Screen, req: Request) -> Response:
    return Stream(_mjpeg(_runner(app)), "multipart/x-mixed-replace; boundary=frame")


def _mjpeg(live: LiveRunner) -> Iterator[bytes]:
    for captured, jpeg in live.frames():
        yield (
            b"--frame\r\nContent-Type: image/jpeg\r\n"
            + f"X-Frame-Time: {captured:.6f}\r\n".encode()
            + f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
            + jpeg
            + b"\r\n"
        )


def start(app: Screen, req: Request) -> Response:
    live = _runner(app)
    try:
        target = int(req.form.get("target") or 0)
    except ValueError:
        raise HttpError("400 Bad Request", "the target is a number of cells") from None
    if not 0 <= target <= 100_000:
        raise HttpError("400 Bad Request", "the target is between 0 (none) and 100000 cells")
    try:
        folder = live.start(target)
    except Exception as e:  # noqa: BLE001 - a camera that will not open, a model that will not load
        raise HttpError("409 Conflict", f"the session did not start: {e}") from e
    log.info("live session %s started by %s", folder.name, req.user)
    return redirect("/live")


def pause(app: Screen, req: Request) -> Response:
    _runner(app).pause(req.path.rstrip("/").endswith("/pause"))
    return redirect("/live")


def stop(app: Screen, req: Request) -> Response:
    _runner(app).stop()
    log.info("live session stopped by %s", req.user)
    return redirect("/live")

"""The screen's live session: one recording session run by the screen's process (it owns the
camera), its latest frame for the browser, and start / pause / stop.

The session is the same :class:`bmc.edge_app.session.EdgeSession` that ``bmc edge run`` and the service
run, in a thread of its own. After each frame it hands this module a *reference* to the frame and
its cells; drawing the boxes and JPEG-encoding happen in the thread of the browser's stream, at
most ``max_fps`` times a second and only while someone watches, so the page never slows capture.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from bmc.edge_app.cells import CellCall
from bmc.edge_app.config import ModelConfig
from bmc.edge_app.sources.base import Frame

if TYPE_CHECKING:
    from bmc.edge_app.session import EdgeSession, SessionConfig


@dataclasses.dataclass
class LiveFrame:
    image: np.ndarray | None
    cells: list[CellCall]
    captured: float  # the frame source's timestamp (time.time())
    seq: int


PAUSED_GRACE_S = 2.0  # paused, how long the stream waits for the frame in flight


class LiveRunner:
    def __init__(
        self,
        storage: str | Path,
        source: str,
        model: str | Path | None,
        session_config: SessionConfig | None = None,
        camera_options: dict[str, Any] | None = None,
        max_fps: float = 8.0,
        model_config: ModelConfig | None = None,
    ) -> None:
        self.storage = Path(storage)
        self.source = source
        self.model = model
        self.session_config = session_config
        self.model_config = model_config or ModelConfig()
        self.camera_options = camera_options or {}
        self.max_fps = max_fps
        self._lock = threading.Condition()
        self._starting = threading.Lock()  # one start at a time: two presses of Start start one session
        self._latest: LiveFrame | None = None
        self._seq = 0
        self.session: EdgeSession | None = None
        self.thread: threading.Thread | None = None
        self.folder: Path | None = None
        self.error = ""

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, target: int | None = None) -> Path:
        """Start a session into a new time-stamped folder of the storage folder; a second start while
        one runs (or while one is starting) is refused, so Stop always reaches the one recording."""
        if not self._starting.acquire(blocking=False):
            raise RuntimeError("a session is starting already")
        try:
            return self._start(target)
        finally:
            self._starting.release()

    def _start(self, target: int | None) -> Path:
        from bmc.edge_app.active import active_model
        from bmc.edge_app.factory import classifier
        from bmc.edge_app.service import new_session_folder
        from bmc.edge_app.session import EdgeSession, SessionConfig
        from bmc.edge_app.sources import open_source

        if self.running:
            raise RuntimeError("a session is running already: stop it first")
        cfg = dataclasses.replace(
            self.session_config or SessionConfig(), headless=True, target=target or None, on_existing="refuse"
        )
        clf = classifier(self.model_config, active_model(self.storage) or self.model)
        self.folder = new_session_folder(self.storage)
        source = open_source(self.source, **self.camera_options) if self.camera_options else self.source
        self.session = EdgeSession(source, clf, self.folder, cfg, echo=lambda m: None)
        self.session.on_frame = self._on_frame
        self.error = ""
        self.thread = threading.Thread(target=self._run, name="live-session", daemon=True)
        self.thread.start()
        return self.folder

    def _run(self) -> None:
        assert self.session is not None  # started by start(), which made it
        try:
            self.session.run()
        except Exception as e:  # noqa: BLE001 - shown on the page; the session database has what was counted
            self.error = str(e)
        with self._lock:
            self._lock.notify_all()

    def _on_frame(self, frame: Frame, cells: list[CellCall]) -> None:
        with self._lock:
            self._seq += 1
            self._latest = LiveFrame(frame.image, cells, frame.timestamp, self._seq)
            self._lock.notify_all()

    @property
    def paused(self) -> bool:
        return self.session is not None and self.session.paused

    def pause(self, paused: bool) -> None:
        if self.session is not None:
            self.session.pause(paused)

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop the session; pressed while one is starting, it stops that one once started."""
        with self._starting:
            session, thread = self.session, self.thread
        if session is not None:
            session.stop()
        if thread is not None:
            thread.join(wait_s)

    def state(self) -> dict[str, Any]:
        s = self.session
        if s is None:
            return {"state": "idle"}
        d = s.diff
        tally = d.tally()  # one moment's count: every figure below is of it
        counts, flagged, unknown = tally
        record = d.record(tally)
        return {
            "state": "paused" if s.paused and self.running else "running" if self.running else s.result.status,
            "folder": self.folder.name if self.folder else "",
            "frames": s.result.frames,
            "counted": d.counted_in(counts),
            "target": d.target,
            "for_review": flagged,
            "unknown": unknown,
            "classes": record.lines(),
            "ratios": record.ratios(),
            "counts": counts,
            "differential": record.to_dict(),
            "error": self.error,
            "last_cells": self.last_cells(),
        }

    def last_cells(self, n: int = 8) -> list[dict[str, Any]]:
        """The newest cells the session recorded (newest first), for the page's strip of crops."""
        import sqlite3

        from bmc.edge_app import sessiondb

        if self.folder is None or not sessiondb.path_of(self.folder).exists():
            return []
        try:
            db = sessiondb.connect(self.folder)
            try:
                rows = sessiondb.recent_cells(db, n)
            finally:
                db.close()
        except (sqlite3.Error, FileNotFoundError):
            return []
        return [{"id": i, "label": label, "flag": flag} for i, label, flag in rows]

    def frames(self, timeout_s: float = 30.0) -> Iterator[tuple[float, bytes]]:
        """JPEG parts of the latest frames, each once, at most ``max_fps`` a second, while the
        session runs (for the MJPEG stream). Paused, the stream ends once the latest frame is out:
        a page left open on a paused session holds no request thread (browsers reuse few
        connections per server: held streams made a Resume press wait for one to time out)."""
        from bmc.edge_app.session import annotated

        seen = 0
        last = 0.0
        while True:
            wait = 1.0 / self.max_fps - (time.monotonic() - last)
            if wait > 0:  # the rate limit first, then the freshest frame: no frame waits out the limit
                time.sleep(wait)
            with self._lock:
                end = time.time() + timeout_s
                while (self._latest is None or self._latest.seq == seen) and self.running and time.time() < end:
                    # paused: the field in flight when Pause was pressed is finished and shown, then the
                    # stream ends (the field shown stays on the page; no request thread is held)
                    if seen and self.paused and time.time() > end - timeout_s + PAUSED_GRACE_S:
                        return
                    self._lock.wait(0.5)
                item = self._latest
            if item is None or item.seq == seen:
                return
            seen = item.seq
            last = time.monotonic()
            img = annotated(item.image, item.cells)
            if img is None:
                continue
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
            if ok:
                yield item.captured, buf.tobytes()

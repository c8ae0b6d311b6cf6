"""Capture apart from classification, through a bounded queue.

A live camera keeps delivering frames whether or not classification keeps up: one frame waits
while another is classified, and a newer one replaces it (the freshest view of the field matters);
the drop is counted. Files are read without drops: every image or video frame is processed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from bmc.edge_app.sources import FrameSource
from bmc.edge_app.sources.base import Frame

_END = object()
log = logging.getLogger(__name__)


class Capture:
    def __init__(self, source: FrameSource, maxsize: int | None = None):
        self.source = source
        # a camera: the freshest frame only (one waiting while one is classified: the least delay);
        # files: a little read-ahead
        maxsize = maxsize or (1 if source.live else 4)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        # who closes the source: stop(), once the thread has left it; or the thread as it leaves,
        # where stop() gave up waiting for a read (never both, never under the read)
        self._lock = threading.Lock()
        self._left = False
        self._close_on_leaving = False
        self.source_closed = False

    def start(self) -> "Capture":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for frame in self.source.frames():
                if self._stop.is_set():
                    break
                if self.source.live:
                    while True:
                        try:
                            self.q.put_nowait(frame)
                            break
                        except queue.Full:
                            try:
                                self.q.get_nowait()
                                self.dropped += 1
                            except queue.Empty:
                                pass
                else:
                    while not self._stop.is_set():
                        try:
                            self.q.put(frame, timeout=0.2)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.error = e
        finally:
            with self._lock:
                self._left = True
                close = self._close_on_leaving
            if close:
                try:
                    self._close()
                except Exception:  # noqa: BLE001 - the end marker must still reach the consumer
                    log.exception("closing the frame source after its last read failed")
            while True:
                try:
                    self.q.put(_END, timeout=0.2)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        break

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():  # halted while waiting for a frame (a camera away, or stalled)
                    return
                continue
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def _close(self) -> None:
        with self._lock:
            if self.source_closed:
                return
            self.source_closed = True
        self.source.close()

    def halt(self) -> None:
        """Ask the reading to end, from any thread or a signal handler (it only sets flags): the
        consumer's loop ends at its next wait for a frame, the source stops waiting for its device."""
        self._stop.set()
        self.source.halt()

    def stop(self, wait_s: float = 2.0) -> bool:
        """Stop reading: the source is told to halt (a camera waiting to reopen stops waiting), the
        capture thread leaves it (it sees the flag at the next frame), then the source is closed, so
        a camera or a video is never released under a read in flight (OpenCV's capture is not safe
        to release from another thread mid-read). A read that still hangs after ``wait_s`` (a
        stalled camera) is left to finish: the thread closes the source as it leaves, and stop()
        returns False. Should the program end first, the read is never finished and the operating
        system releases the device."""
        self.halt()
        mine = self._thread is threading.current_thread()
        if self._thread.is_alive() and not mine:
            self._thread.join(wait_s)
        with self._lock:
            if self._thread.ident is not None and not self._left and not mine:
                self._close_on_leaving = True
                return False
        self._close()
        return True

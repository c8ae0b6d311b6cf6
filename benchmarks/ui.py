"""The screen's cost and delay (``bmc bench ui``): frame-to-browser latency and the pipeline's
frame rate with the screen attached and one viewer, against the same pipeline headless.

The frames come from a *replayed camera*: real fields (``--source``) delivered at ``--fps`` as a
live source, so that classification that falls behind drops frames as it does with a real camera
(a folder would be read as fast as it is processed, and its read-ahead would count as delay).
Latency is measured per MJPEG part: the time the part reaches the client minus the frame's capture
time, which the stream sends with each part (``X-Frame-Time``); client and server share a clock.
"""

from __future__ import annotations

import http.client
import itertools
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bmc.edge_app.sources import IMAGE_SUFFIXES, Frame, FrameSource


class ReplayedCamera(FrameSource):
    live = True

    def __init__(self, folder: str | Path, fps: float, frames: int):
        from bmc.contract import read_image

        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:50]
        if not paths:
            raise ValueError(f"{folder}: no images")
        self.images = [read_image(str(p)) for p in paths]
        self.fps, self.n = fps, frames
        self._stop = False

    def _frames(self):
        t0 = time.perf_counter()
        for i, img in zip(range(self.n), itertools.cycle(self.images)):
            if self._stop:
                return
            delay = t0 + i / self.fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield Frame(img, "replayed", i, time.time(), False)

    def close(self):
        self._stop = True


def _headless(folder, fps, frames, model, storage) -> float:
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig

    s = EdgeSession(
        ReplayedCamera(folder, fps, frames),
        CellClassifier(model or DEFAULT_MODEL),
        storage / "headless",
        SessionConfig(save_crops=True),
        echo=lambda m: None,
    )
    return s.run().fps


def _with_ui(source, fps, frames, model, storage) -> tuple[float, list[float]]:
    from waitress import create_server

    from bmc.edge_app.ui.app import UiApp, stop_from_another_thread
    from bmc.edge_app.ui.live import LiveRunner

    live = LiveRunner(storage, None, model)
    live.source = ReplayedCamera(source, fps, frames)
    app = UiApp(storage, None, sign_in=False, user="bench", live=live)
    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    delays: list[float] = []
    try:
        live.start(0)
        c = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=60)
        c.request("GET", "/live/stream", headers={"Host": "127.0.0.1"})
        r = c.getresponse()
        buf = b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                head = buf[:head_end].decode("latin-1")
                length = int(head.split("Content-Length:")[1].split("\r\n")[0])
                if len(buf) < head_end + 4 + length + 2:
                    break
                delays.append(time.time() - float(head.split("X-Frame-Time:")[1].split("\r\n")[0]))
                buf = buf[head_end + 4 + length + 2 :]
        c.close()
        live.thread.join(120)
        return live.session.result.fps, delays
    finally:
        live.stop()
        stop_from_another_thread(server, loop)


def run(source, fps: float = 30.0, frames: int = 300, model=None, rounds: int = 3, log=print) -> dict:
    """``rounds`` pairs of runs, headless then with the screen, alternating (the machine's speed
    drifts; medians are reported)."""
    heads, uis, delays = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(rounds):
            storage = Path(tmp) / f"round{k}"
            storage.mkdir()
            heads.append(_headless(source, fps, frames, model, storage))
            ui_fps, d = _with_ui(source, fps, frames, model, storage)
            uis.append(ui_fps)
            delays += d
            log(f"round {k + 1}: headless {heads[-1]:.1f} frames/s, with the screen {ui_fps:.1f}")
    d = np.array(delays) * 1000
    headless, with_ui = float(np.median(heads)), float(np.median(uis))
    return {
        "source": str(source),
        "replayed_fps": fps,
        "frames": frames,
        "rounds": rounds,
        "headless_fps": headless,
        "ui_fps": with_ui,
        "ratio": with_ui / headless if headless else 0.0,
        "parts": len(d),
        "headless_fps_runs": heads,
        "ui_fps_runs": uis,
        "latency_ms_p50": float(np.percentile(d, 50)) if len(d) else None,
        "latency_ms_p95": float(np.percentile(d, 95)) if len(d) else None,
    }


def markdown(r: dict) -> str:
    return (
        f"replayed camera at {r['replayed_fps']:g} fps, {r['frames']} frames of {r['source']}, {r['rounds']} "
        f"rounds (medians): pipeline {r['headless_fps']:.1f} frames/s headless, {r['ui_fps']:.1f} with the screen "
        "and one viewer "
        f"({100 * r['ratio']:.0f}%); frame to viewer over {r['parts']} MJPEG parts: p50 "
        f"{r['latency_ms_p50']:.0f} ms, p95 {r['latency_ms_p95']:.0f} ms"
    )

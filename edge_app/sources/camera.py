"""Live cameras: USB/UVC through OpenCV (V4L2), Jetson CSI through GStreamer, the Pi camera
through Picamera2. A camera that disappears is reopened with exponential backoff, and the gap is
logged and counted."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from bmc.edge_app.sources.base import Frame, FrameSource, SourceError

if TYPE_CHECKING:
    import cv2
    import numpy as np

log = logging.getLogger(__name__)


class _Reopening(FrameSource):
    live = True
    max_backoff_s = 30.0
    first_backoff_s = 0.5  # the first wait before reopening a lost camera; doubled each time
    name: str  # set by each camera before it opens
    _dev: Any  # the open device (None: closed); each camera narrows it

    def __init__(
        self,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        fourcc: str | None = None,
        max_reopen_s: float | None = None,
    ) -> None:
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.max_reopen_s = max_reopen_s  # None: keep trying (service mode)
        self.gaps: list[tuple[float, float]] = []  # (lost at, back at)
        self._halted = threading.Event()  # halt(): the reopening stops waiting and the frames end
        self._dev = None
        self._open_or_raise()

    def _open_or_raise(self) -> None:
        self._dev = self._open()
        if self._dev is None:
            raise SourceError(f"{self.name}: camera not found or busy")

    def _open(self) -> Any: ...

    def _read(self) -> np.ndarray | None: ...

    def _release(self) -> None: ...

    def _frames(self) -> Iterator[Frame]:
        i = 0
        while True:
            img = self._read() if self._dev is not None else None
            if img is not None:
                yield Frame(img, self.name, i, time.time(), False)
                i += 1
                continue
            lost = time.time()
            log.warning("%s: camera lost; reopening", self.name)
            self._release()
            delay = self.first_backoff_s
            while True:
                if self._halted.wait(delay):  # stopped while the camera was away
                    self.gaps.append((lost, time.time()))
                    return
                self._dev = self._open()
                if self._dev is not None:
                    break
                if self.max_reopen_s is not None and time.time() - lost > self.max_reopen_s:
                    self.gaps.append((lost, time.time()))
                    raise SourceError(f"{self.name}: camera gone for {time.time() - lost:.0f} s; giving up")
                delay = min(delay * 2, self.max_backoff_s)
            self.gaps.append((lost, time.time()))
            log.warning("%s: camera back after %.1f s", self.name, time.time() - lost)

    def halt(self) -> None:
        self._halted.set()

    def close(self) -> None:
        self._release()


class OpenCVCamera(_Reopening):
    _dev: cv2.VideoCapture | None

    def __init__(self, device: int | str, **kw: Any) -> None:
        self.device = device
        self.name = str(device)
        super().__init__(**kw)

    def _open(self) -> cv2.VideoCapture | None:
        import cv2

        cap = (
            cv2.VideoCapture(self.device, cv2.CAP_V4L2)
            if isinstance(self.device, str)
            else cv2.VideoCapture(self.device)
        )
        if not cap.isOpened():
            return None
        if self.fourcc:
            # the stubs know only cv2.VideoWriter.fourcc, not this alias of it
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))  # type: ignore[attr-defined]
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        return cap

    def _read(self) -> np.ndarray | None:
        ok, img = cast("cv2.VideoCapture", self._dev).read()  # read only while open
        return img if ok else None

    def _release(self) -> None:
        if self._dev is not None:
            self._dev.release()
        self._dev = None


def has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


class GStreamerCamera(OpenCVCamera):
    """A GStreamer pipeline ending in ``appsink`` (e.g. ``nvarguscamerasrc ! … ! appsink``);
    needs an OpenCV built with GStreamer, as JetPack's is."""

    def _open(self) -> cv2.VideoCapture | None:
        import cv2

        if not has_gstreamer():
            raise SourceError(
                "this OpenCV has no GStreamer support; on a Jetson use JetPack's OpenCV "
                "(make the venv with --system-site-packages; see docs/deploy.md)"
            )
        cap = cv2.VideoCapture(self.device, cv2.CAP_GSTREAMER)
        return cap if cap.isOpened() else None


class Picamera2Camera(_Reopening):
    # Picamera2's "RGB888" is B, G, R in memory (libcamera names formats by word order, so "BGR888"
    # would be R, G, B): asked for RGB888, the camera hands over OpenCV's order as it is
    native_format = "BGR"

    def __init__(self, index: int = 0, **kw: Any) -> None:
        try:
            import picamera2  # noqa: F401
        except ImportError as e:
            raise SourceError(
                "the Raspberry Pi camera needs Picamera2, which comes with the OS: "
                "sudo apt install python3-picamera2, and make the venv with "
                "--system-site-packages"
            ) from e
        self.index = index
        self.name = f"picamera2:{index}"
        super().__init__(**kw)

    def _open(self) -> Any:
        from picamera2 import Picamera2

        try:
            cam = Picamera2(self.index)
            size = (self.width or 1280, self.height or 960)
            cam.configure(cam.create_video_configuration(main={"size": size, "format": "RGB888"}))
            cam.start()
            return cam
        except Exception as e:  # noqa: BLE001 - libcamera raises many types
            log.warning("picamera2:%d: %s", self.index, e)
            return None

    def _read(self) -> np.ndarray | None:
        try:
            return cast("np.ndarray", self._dev.capture_array("main"))
        except Exception:  # noqa: BLE001
            return None

    def _release(self) -> None:
        if self._dev is not None:
            try:
                self._dev.stop()
                self._dev.close()
            except Exception:  # noqa: BLE001
                pass
        self._dev = None

"""Frame sources: where fields come from. Each declares the pixel format of its frames.

``open_source(spec)`` picks one from a spec string:

* an integer (``0``) or a ``/dev/video*`` / ``/dev/v4l/by-id/...`` path → a USB/UVC camera via OpenCV;
* ``picamera2`` or ``picamera2:N`` → the Raspberry Pi camera (libcamera; OpenCV cannot open it);
* a string containing ``!`` → a GStreamer pipeline (Jetson CSI cameras), ending in ``appsink``;
* a video file (``.mp4``, ``.avi``, ``.mkv``, ``.mov``) → frames of the video;
* a folder or a glob → every image in it, each its own field; a single image file → one field.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import time
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v"}


class SourceError(RuntimeError):
    """A source that cannot be opened; the message names it."""


@dataclasses.dataclass
class Frame:
    image: np.ndarray | None  # None: a corrupt frame, skipped and counted
    source: str  # file name for files and folders, the device for cameras
    index: int
    timestamp: float
    still: bool  # True for image files: each is its own field, no tracking across files
    error: str = ""


class FrameSource(abc.ABC):
    """Yields :class:`Frame` s; ``pixel_format`` says what their arrays hold."""

    pixel_format = "BGR"
    live = False  # a camera: frames may be dropped when classification falls behind

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class ImageFiles(FrameSource):
    def __init__(self, paths: list[Path], name: str):
        if not paths:
            raise SourceError(f"{name}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.paths, self.name = paths, name

    def frames(self):
        from bmc.contract import read_image

        for i, p in enumerate(self.paths):
            try:
                img, err = read_image(str(p)), ""
            except ValueError as e:
                img, err = None, str(e)
            yield Frame(img, p.name, i, time.time(), True, err)


class VideoFile(FrameSource):
    def __init__(self, path: str):
        import cv2

        self.path = path
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise SourceError(f"{path}: cannot open video (missing file or codec)")

    def frames(self):
        i = 0
        while True:
            ok, img = self.cap.read()
            if not ok:
                return
            yield Frame(img, Path(self.path).name, i, time.time(), False)
            i += 1

    def close(self):
        self.cap.release()


def open_source(spec: str, **camera_options) -> FrameSource:
    from edge_app.sources.camera import OpenCVCamera, GStreamerCamera, Picamera2Camera

    s = str(spec)
    if s.isdigit() or s.startswith("/dev/"):
        return OpenCVCamera(int(s) if s.isdigit() else s, **camera_options)
    if s.startswith("picamera2"):
        return Picamera2Camera(int(s.split(":")[1]) if ":" in s else 0, **camera_options)
    if "!" in s:
        return GStreamerCamera(s, **camera_options)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        return ImageFiles(files, s)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return VideoFile(s)
    if p.is_file():
        return ImageFiles([p], s)
    if any(ch in s for ch in "*?["):
        return ImageFiles(sorted(Path(f) for f in glob.glob(s) if Path(f).suffix.lower() in IMAGE_SUFFIXES), s)
    raise SourceError(f"{s}: no such file, folder, camera or pipeline")

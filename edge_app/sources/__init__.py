"""Frame sources: where fields come from. Every source delivers BGR frames (OpenCV's order, which
the finder, the lamp, the crops written and read back, and the screen all assume): a device whose
arrays hold another order declares it (``native_format``), and :meth:`FrameSource.frames`
converts, the one place colour order is dealt with.

``open_source(spec)`` picks one from a spec string:

* an integer (``0``) or a ``/dev/video*`` / ``/dev/v4l/by-id/...`` path → a USB/UVC camera via OpenCV;
* ``picamera2`` or ``picamera2:N`` → the Raspberry Pi camera (libcamera; OpenCV cannot open it);
* a string containing ``!`` → a GStreamer pipeline (Jetson CSI cameras), ending in ``appsink``;
* a video file (``.mp4``, ``.avi``, ``.mkv``, ``.mov``) → frames of the video;
* a folder or a glob → every image in it, each its own field; a single image file → one field.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from bmc.edge_app.sources.base import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Frame,
    FrameSource,
    ImageFiles,
    SourceError,
    VideoFile,
)
from bmc.edge_app.sources.camera import GStreamerCamera, OpenCVCamera, Picamera2Camera

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Frame",
    "FrameSource",
    "GStreamerCamera",
    "ImageFiles",
    "OpenCVCamera",
    "Picamera2Camera",
    "SourceError",
    "VideoFile",
    "open_source",
]


def is_camera(spec: str) -> bool:
    """Whether :func:`open_source` opens ``spec`` as a camera or a pipeline, not as files."""
    s = str(spec)
    return s.isdigit() or s.startswith(("/dev/", "picamera2")) or "!" in s


def recorded_name(spec: str) -> str:
    """How a session records its source: a file, folder or pattern by its absolute path (a relative
    one means nothing once the report is read elsewhere), a camera as it was named (a stable
    ``/dev/v4l/by-id/…`` link is not resolved to the ``/dev/videoN`` it points at today)."""
    return spec if is_camera(spec) else os.path.abspath(spec)


def open_source(spec: str, **camera_options: Any) -> FrameSource:
    s = str(spec)
    if s.isdigit() or s.startswith("/dev/"):  # (is_camera)
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
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFiles([p], s)
    if p.is_file():
        raise SourceError(
            f"{s}: not an image or a video (images: {', '.join(sorted(IMAGE_SUFFIXES))}; "
            f"videos: {', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if any(ch in s for ch in "*?["):
        return ImageFiles(sorted(Path(f) for f in glob.glob(s) if Path(f).suffix.lower() in IMAGE_SUFFIXES), s)
    raise SourceError(f"{s}: no such file, folder, camera or pipeline")

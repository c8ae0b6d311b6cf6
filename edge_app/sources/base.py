"""What every frame source is: a :class:`Frame`, the :class:`FrameSource` contract (BGR out, the
one place colour order is settled), the error a source raises, and the file sources (images, a
video). The live cameras are in :mod:`bmc.edge_app.sources.camera`; :func:`bmc.edge_app.sources.open_source`
picks one from a spec string."""

from __future__ import annotations

import abc
import dataclasses
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from bmc.errors import BmcError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v"}


class SourceError(BmcError, RuntimeError):
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
    """Yields :class:`Frame` s of BGR images. A subclass reads its device in :meth:`_frames` and
    declares in ``native_format`` the order its arrays hold (``"BGR"`` or ``"RGB"``)."""

    native_format = "BGR"
    live = False  # a camera: frames may be dropped when classification falls behind
    start = 0  # files and videos: the first frame index to deliver (a resumed session)
    end_reason = ""  # why the frames ended, when not simply at the end of the source

    def frames(self) -> Iterator[Frame]:
        """The source's frames, each image BGR whatever the device gave."""
        if self.native_format not in ("BGR", "RGB"):
            raise SourceError(f"{type(self).__name__}: unknown native format {self.native_format!r}")
        for frame in self._frames():
            if frame.image is not None:
                frame.image = self._bgr(frame.image)
            yield frame

    def _bgr(self, image: np.ndarray) -> np.ndarray:
        """An image as the device gave it, in BGR order."""
        if self.native_format == "RGB" and image.ndim == 3:
            return np.ascontiguousarray(image[..., 2::-1])
        return image

    @abc.abstractmethod
    def _frames(self) -> Iterator[Frame]: ...

    def peek(self, n: int) -> list[np.ndarray]:
        """The first ``n`` readable images of the source, BGR whatever the device gives, read apart
        from :meth:`frames` and whatever ``start`` is (a subclass that can read ahead gives them in
        :meth:`_peek`); none from a live source, whose frames are not there yet."""
        return [self._bgr(x) for x in self._peek(n)[:n]]

    def _peek(self, n: int) -> list[np.ndarray]:
        return []

    def halt(self) -> None:  # noqa: B027 - optional hook
        """Stop waiting for the device (called from another thread before :meth:`close`): a source
        that retries or sleeps between reads stops doing so and ends its frames."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class ImageFiles(FrameSource):
    """Image files, each its own field. At least one must decode, or the source is refused before a
    session folder is made (a folder with some corrupt files still runs: they are skipped and
    counted)."""

    def __init__(self, paths: list[Path], name: str):
        from bmc.contract import read_image

        if not paths:
            raise SourceError(f"{name}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.paths, self.name = paths, name
        errors = []
        for p in paths:  # usually the first decodes, and the probe stops there
            try:
                read_image(str(p))
                break
            except ValueError as e:
                errors.append(str(e))
        else:
            # one image: its error names it already (the path said once)
            raise SourceError(
                errors[0]
                if len(errors) == 1
                else f"{name}: none of its {len(paths)} images decodes (first: {errors[0]})"
            )

    def _peek(self, n: int) -> list[np.ndarray]:
        from bmc.contract import read_image

        out: list[np.ndarray] = []
        for p in self.paths:
            if len(out) >= n:
                break
            try:
                out.append(read_image(str(p)))
            except (ValueError, OSError):
                continue  # skipped as the session skips it
        return out

    def _frames(self) -> Iterator[Frame]:
        from bmc.contract import read_image

        for i, p in enumerate(self.paths):
            if i < self.start:
                continue
            try:
                img, err = read_image(str(p)), ""
            except ValueError as e:
                img, err = None, str(e)
            except OSError as e:  # a folder named like an image, a link to nothing: skipped, counted, named
                img, err = None, f"{p}: cannot be read ({e.strerror or e})"
            yield Frame(img, p.name, i, time.time(), True, err)


class VideoFile(FrameSource):
    """The frames of a video file. A frame that cannot be decoded is delivered as a corrupt frame
    (skipped and counted) and reading goes on; the video ends at its last readable frame, or after
    ``max_bad`` unreadable frames in a row (``end_reason`` then says where)."""

    def __init__(self, path: str, max_bad: int = 25):
        import cv2

        self.path = path
        self.max_bad = max_bad
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise SourceError(f"{path}: cannot open video (missing file or codec)")
        self.length = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # 0: unknown (a stream)

    def _frames(self) -> Iterator[Frame]:
        name = Path(self.path).name
        i = 0
        bad: list[int] = []  # unreadable frames since the last good one: corrupt if one follows
        while len(bad) < self.max_bad:
            if i < self.start:  # already recorded: skip without decoding
                ok, img = self.cap.grab(), None
            else:
                ok, img = self.cap.read()
                ok = ok and img is not None
            if not ok:
                bad.append(i)
                i += 1
                continue
            for b in bad:
                if b >= self.start:
                    yield Frame(None, name, b, time.time(), False, "undecodable video frame")
            bad = []
            if i >= self.start:
                yield Frame(img, name, i, time.time(), False)
            i += 1
        if self.length and bad and bad[0] < self.length - 1:
            self.end_reason = (
                f"{name}: stopped after {len(bad)} unreadable frames in a row from frame {bad[0]} of {self.length}"
            )

    def _peek(self, n: int) -> list[np.ndarray]:
        import cv2

        cap, tries = cv2.VideoCapture(self.path), 0
        out: list[np.ndarray] = []
        try:
            while len(out) < n and tries < n + self.max_bad:
                tries += 1
                ok, img = cap.read()
                if ok and img is not None:
                    out.append(img)
        finally:
            cap.release()
        return out

    def close(self) -> None:
        self.cap.release()

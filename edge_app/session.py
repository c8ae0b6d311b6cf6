"""The edge session: frames → cells → classes → a differential count, recorded as it goes.

Read a frame, find the nucleated cells (``--mode field``) or take the frame as one centred cell
(``--mode cell``, like the training crops), cut each at the model's trained scale, classify the
cells of a frame as one batch, count new cells once (tracking across frames of a still field),
flag doubtful ones for review, and commit the frame to the session database before reading the
next. With a screen, an OpenCV window shows it live; ``--headless`` prints counts instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bmc.contract import centre_square, preprocess
from bmc.edge_app import unknown as unknown_mod
from bmc.edge_app.calibration import LabCalibration
from bmc.edge_app.capture import Capture
from bmc.edge_app.cells import Box, CellCall, CutDiameter, SessionLamp, crop_cell
from bmc.edge_app.classifier import CellClassifier
from bmc.edge_app.config import SessionDefaults
from bmc.edge_app.detect import FinderConfig, RedCells, find_cells, scaled
from bmc.edge_app.differential import Differential, ReviewPolicy
from bmc.edge_app.sessiondb import SHORT as SHORT  # the status of a session short of its target
from bmc.edge_app.sessiondb import RecordedConfig
from bmc.edge_app.sources import FrameSource, open_source, recorded_name
from bmc.edge_app.sources.base import Frame
from bmc.edge_app.store import SessionStore, StorageFull
from bmc.edge_app.tracker import CellTracker, TrackViews

log = logging.getLogger(__name__)
STAGES = ("read", "find", "preprocess", "classify", "record")
MAX_FRAME_PIXELS = 40_000_000  # a 8K camera frame is 33 MP; a whole-slide scan needs tiling, not one frame


_DEVICE = SessionDefaults()  # the device config's defaults: one source for those both share


@dataclasses.dataclass
class SessionConfig:
    """One session as it runs (the device's ``[session]`` settings, resolved; the CLI's options).
    Where a setting is also in the device config, its default is that one: ``SessionDefaults``."""

    mode: str = _DEVICE.mode  # field | cell
    target: int | None = None  # the device config's 0 ("no target") is None here
    headless: bool = True
    save_crops: bool = _DEVICE.save_crops
    cell_diameter_px: float | None = None  # fixed scale; None (the config's 0): running median of found cells
    white_balance: bool = False  # onto the model's training lamp, where its card has one (opt-in)
    print_every_s: float = _DEVICE.print_every_s
    max_frames: int | None = None
    on_existing: str = "resume"  # a folder that holds a session: resume it (interrupted), "new" or "refuse"
    specimen: str | None = None  # blood | marrow; None: the model card's
    lab_gates: bool = True  # the gates a laboratory calibrated (the model card's calibration), where there are
    # the session's recorded start (ISO 8601); None: now. It seeds the session's random calibration
    # order (bmc.edge_app.calibration), so a benchmark pins it to draw the same sample on every run
    started: str | None = None
    finder: FinderConfig = dataclasses.field(default_factory=FinderConfig)
    review: ReviewPolicy = dataclasses.field(default_factory=ReviewPolicy)

    def __post_init__(self) -> None:
        if self.mode not in ("field", "cell"):
            raise ValueError(f"mode must be 'field' or 'cell', got {self.mode!r}")
        if self.specimen not in (None, "blood", "marrow"):
            raise ValueError(f"specimen must be 'blood' or 'marrow', got {self.specimen!r}")


MAX_LISTED_CORRUPT = 10  # unreadable frames named one by one on the console


@dataclasses.dataclass
class SessionResult:
    frames: int = 0
    cells: int = 0
    counted: int = 0
    flagged: int = 0
    corrupt_frames: int = 0
    dropped_frames: int = 0
    partial_cells: int = 0  # moving cells never wholly in the frame: not counted
    seconds: float = 0.0
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {s: 0.0 for s in STAGES})
    status: str = "finished"
    message: str = ""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


class EdgeSession:
    def __init__(
        self,
        source: FrameSource | str,
        classifier: CellClassifier,
        out_dir: str | Path,
        config: SessionConfig = SessionConfig(),
        echo: Callable[[str], None] = print,
    ) -> None:
        self.source = open_source(source) if isinstance(source, str) else source
        self.source_name = recorded_name(source) if isinstance(source, str) else type(source).__name__
        self.clf = classifier
        self.cfg = config
        self.echo = echo
        self.specimen = config.specimen or classifier.card.specimen
        # cells unlike any the model knows are set aside before they are counted (None: the model's
        # card has no unknown-cell calibration, or the level is 0)
        self.unknown = classifier.unknown.at(config.review.unknown_level) if classifier.unknown else None
        # gates calibrated at this laboratory's microscope, where the model's card has them
        # (bmc edge adapt with a random reviewed sample): they replace the training laboratory's
        self.calibration = (
            LabCalibration.from_dict(classifier.card.raw["calibration"])
            if (config.lab_gates and classifier.card.raw.get("calibration"))
            else None
        )
        if self.calibration is not None:
            config = dataclasses.replace(
                config,
                review=dataclasses.replace(
                    config.review, min_confidence=self.calibration.min_confidence, min_margin=0.0
                ),
            )
            self.cfg = config
            if (
                self.unknown is not None
                and self.calibration.unknown_threshold is not None
                and config.review.unknown_level
            ):
                self.unknown = self.unknown.with_threshold(self.calibration.unknown_threshold, self.calibration.level)
        self.diff = Differential(classifier.labels, config.target, config.review, self.specimen)
        self.scale = CutDiameter(config.cell_diameter_px)
        # the red cells' diameter: the field's magnification (fixed where the device's config gives it)
        self.field_scale = RedCells(config.finder.red_cell_px or None)
        self._finder = config.finder
        self.lamp = SessionLamp(classifier.contract.lamp, config.white_balance)
        self.tracker = CellTracker()
        # moving cells (a video, a camera over a panned stage) wait to be judged on whole views
        self._views: dict[int, TrackViews] = {}
        self._judged: set[int] = set()
        self.judge_views = 3  # counted once wholly in view this many times (or when it leaves, if fewer)
        self.store = SessionStore(
            out_dir,
            self.source_name,
            classifier.path.name,
            classifier.sha256,
            classifier.labels,
            RecordedConfig(
                mode=config.mode,
                target=config.target,
                specimen=self.specimen,
                orientations=classifier.orientations,
                white_balance=self.lamp.active,
                finder=dataclasses.asdict(config.finder),
                review=dataclasses.asdict(config.review),
                unknown=(
                    {"score": unknown_mod.SCORE, "level": self.unknown.level, "threshold": self.unknown.threshold}
                    if self.unknown is not None
                    else None
                ),
                calibration=self.calibration.to_dict() if self.calibration is not None else None,
                contract=classifier.contract.to_dict(),
                model=classifier.description,
                head=(
                    {
                        "file": classifier.head.file,
                        "sha256": classifier.head.sha256,
                        "labels": list(classifier.head.labels),
                        "new_labels": (classifier.card.head or {}).get("new_labels", {}),
                    }
                    if classifier.head is not None
                    else None
                ),
            ),
            save_crops=config.save_crops,
            on_existing=config.on_existing,
            resumable=not self.source.live,
            started=config.started,
        )
        self.result = SessionResult()
        if (
            config.mode == "field"
            and config.finder.follow_scale
            and self.field_scale.seed(self.source.peek(self.field_scale.first))
        ):  # files and videos: the first fields' red cells measured before the first is searched (a
            # scale fixed in the config: from the first field of any source)
            self._finder = scaled(config.finder, self.field_scale.diameter)
            self.store.record_scale(self.field_scale.to_dict())
        if self.store.resume_after is not None:
            # the interrupted session goes on after its last committed frame, with its counts and with
            # what its frames taught the adaptive measures (the cells' sizes, the red cells, the lamp)
            self.source.start = self.store.resume_after + 1
            for label, flag in self.store.prior_cells():
                self.diff.restore(label, flag)
            self._restore(self.store.prior_states())
            self.echo(
                f"resuming the interrupted session in {self.store.dir} after frame {self.store.resume_after} "
                f"({self.diff.summary()})"
            )
        self._colour_checked = False
        self.paused = False
        self.on_frame: Callable[[Frame, list[CellCall]], None] | None = (
            None  # called with (frame, cells) after each frame is recorded
        )
        self._stop = False
        self._capture: Capture | None = None  # the running session's: stop() halts it
        self._window: str | None = None
        if not config.headless and not opencv_gui():
            self.echo(f"no live window: {NO_GUI_HINT}; continuing headless")
            self.cfg.headless = True

    def _restore(self, states: list[dict[str, Any]]) -> None:
        """Replay the committed frames' states: the session then measures as if it had never stopped."""
        for st in states:
            if "field" in st:
                self.field_scale.replay(st["field"])
            self.scale.observe(st.get("found", []))
            if st.get("lamp") is not None and self.lamp.active:
                self.lamp.take(st["lamp"])
        if self.field_scale.diameter:
            self._finder = scaled(self.cfg.finder, self.field_scale.diameter)

    # -- one frame --------------------------------------------------------------------------
    def _cells_of(self, image: np.ndarray) -> tuple[list[Box], list[np.ndarray]]:
        c = self.clf.contract
        if self.cfg.mode == "cell":
            h, w = image.shape[:2]
            side = int(round(min(h, w) * c.crop_fraction))
            box = Box((w - side) // 2, (h - side) // 2, side, side)
            return [box], [centre_square(image, c.crop_fraction)]
        if self.field_scale.observe(image):  # the red cells measured: the finder's sizes follow them
            self._finder = scaled(self.cfg.finder, self.field_scale.diameter)
            self.store.record_scale(self.field_scale.to_dict())
        self._state["field"] = self.field_scale.last
        found = find_cells(image, self._finder, self.field_scale.red_colour)
        self._state["found"] = [f.box.diameter for f in found]
        self.scale.observe(self._state["found"])
        boxes = [f.box for f in found]
        return boxes, [crop_cell(image, self.scale.box_for(b), c) for b in boxes]

    def _screen(self, frame: Frame) -> None:
        """Frames the pipeline cannot use well: too large to process within the device's memory
        (refused as a corrupt frame), or without colour (the finder separates nuclei by their stain;
        said once)."""
        img = frame.image
        if img is None:
            return
        if img.shape[0] * img.shape[1] > MAX_FRAME_PIXELS:
            frame.image, frame.error = (
                None,
                (
                    f"frame of {img.shape[1]}x{img.shape[0]} pixels is over the "
                    f"{MAX_FRAME_PIXELS / 1e6:.0f}-megapixel limit; downscale it, or set the "
                    "camera's width and height"
                ),
            )
            return
        if not self._colour_checked:
            self._colour_checked = True
            sample = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64)].astype(np.int16)
            if (
                img.ndim < 3
                or img.shape[2] < 3
                or (
                    np.abs(sample[..., 0] - sample[..., 1]).max() <= 2
                    and np.abs(sample[..., 1] - sample[..., 2]).max() <= 2
                )
            ):
                self.echo(
                    f"warning: {frame.source} looks greyscale: the cell finder separates nuclei by their stain's "
                    "colour, so cells will be missed; use the camera's colour mode"
                )

    def process(self, frame: Frame) -> list[CellCall]:
        r, st = self.result, self.result.stage_seconds
        self._screen(frame)
        if frame.image is None:
            r.corrupt_frames += 1
            log.debug("frame %s of %s skipped: %s", frame.index, frame.source, frame.error)
            if r.corrupt_frames <= MAX_LISTED_CORRUPT:  # the person at the console learns which field was lost
                self.echo(f"warning: frame {frame.index} ({frame.source}) skipped: {frame.error or 'unreadable'}")
            elif r.corrupt_frames == MAX_LISTED_CORRUPT + 1:
                self.echo("warning: more unreadable frames: counted, not listed (the report lists each)")
            self.store.record_frame(frame.index, frame.source, [], [], error=frame.error or "unreadable")
            return []
        t0 = time.perf_counter()
        self._state: dict[str, Any] = {}  # what this frame teaches the adaptive measures, committed with it
        boxes, crops = self._cells_of(frame.image)
        t1 = time.perf_counter()
        self._state["lamp"] = self.lamp.observe(frame.image)
        batch = [preprocess(self.lamp.balance(cr), self.clf.contract, "BGR", crop=False) for cr in crops]
        t2 = time.perf_counter()
        probs, embs = self.clf.predict_cells(np.stack(batch)) if batch else (np.zeros((0, len(self.clf.labels))), None)
        t3 = time.perf_counter()
        if frame.still:
            self.tracker.reset()
        tracks = self.tracker.update(frame.index, boxes)
        keep: list[tuple[CellCall, np.ndarray]] = []  # the cells judged in this frame, to record
        before = self._tally()
        if not frame.still:
            for t in self.tracker.ended:  # a moving cell that left the frame: judged on its whole views
                keep += self._judge(t)
                self._judged.discard(t)
        cells = []
        # a still field's cells are judged now: their unknown-cell scores in one batch
        scores = self.unknown.scores(embs) if frame.still and self.unknown is not None and embs is not None else None
        for k, (box, p, (track, _new)) in enumerate(zip(boxes, probs, tracks)):
            emb = embs[k] if embs is not None else None
            i = int(np.argmax(p))
            if frame.still:  # a field of its own: every cell whole as it will ever be, judged now
                call = self._count(box, p, emb, track, score=None if scores is None else float(scores[k]))
                keep.append((call, crops[k]))
            elif track in self._judged:
                call = CellCall(box, self.clf.labels[i], float(p[i]), p, "seen", track, False, emb)
            else:
                views = self._views.setdefault(track, TrackViews(frame.index))
                views.add(frame.index, box, frame.image.shape, crops[k], p, emb)
                call = CellCall(box, self.clf.labels[i], float(p[i]), p, "tracking", track, False, emb)
                if views.whole >= self.judge_views:  # seen whole often enough: counted while still in view
                    keep += self._judge(track)
                    call.flag = "seen"
            cells.append(call)
        try:
            self.store.record_frame(
                frame.index, frame.source, [c for c, _ in keep], [cr for _, cr in keep], state=self._state
            )
        except BaseException:  # a full disk, an I/O error: the frame's cells are not in the database
            self._back_to(before)  # nor in the count
            raise
        t4 = time.perf_counter()
        st["find"] += t1 - t0
        st["preprocess"] += t2 - t1
        st["classify"] += t3 - t2
        st["record"] += t4 - t3
        r.counted = self.diff.counted
        return cells

    def _count(
        self,
        box: Box,
        p: np.ndarray,
        emb: np.ndarray | None,
        track: int | None,
        frame: int | None = None,
        score: float | None = None,
    ) -> CellCall:
        """One cell into the differential (or set aside for review, or as unknown), as recorded.
        ``score``: its unknown-cell score where the frame's were computed together."""
        unknown = ""
        if self.unknown is not None and emb is not None:
            if score is None:
                scores = self.unknown.scores(np.asarray(emb)[None])
                assert scores is not None  # an embedding in, a score out
                score = float(scores[0])
            unknown = self.unknown.flag(score)
        label, conf, flag = self.diff.add(p, unknown)
        self.result.cells += 1
        self.result.flagged += bool(flag)
        return CellCall(box, label, conf, p, flag, track, True, emb, frame)

    def _judge(self, track: int) -> list[tuple[CellCall, np.ndarray]]:
        """A moving cell's one call, on its views wholly inside the frame: their average class
        probabilities, recorded with the most central view's box, crop and embedding. A cell never
        wholly in view is not counted (:attr:`SessionResult.partial_cells`)."""
        views = self._views.pop(track, None)
        if views is None:
            return []
        self._judged.add(track)
        if views.best is None:
            self.result.partial_cells += 1
            return []
        _, frame, box, crop, _, emb = views.best
        probs = views.probabilities
        assert probs is not None  # a best view is a whole one
        return [(self._count(box, probs, emb, track, frame), crop)]

    # -- control, from any thread: the screen, the service, a signal ---------------------------
    def stop(self) -> None:
        """Finish the frame in flight and close the session (also while paused, or while the camera
        is away: the wait for its next frame ends too)."""
        self._stop = True
        self.paused = False
        self._halt_capture()

    def _halt_capture(self) -> None:
        cap = self._capture
        if cap is not None:
            cap.halt()

    def pause(self, paused: bool = True) -> None:
        """Hold (or, ``False``, resume) the count: a camera's frames are dropped meanwhile."""
        self.paused = paused

    @property
    def stopping(self) -> bool:
        return self._stop

    # -- the loop ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.echo(f"received signal {signum}: finishing the current frame and closing the session")
        self._stop = True
        self._halt_capture()

    def run(self) -> SessionResult:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
        cap = self._capture = Capture(self.source).start()
        if self._stop:  # stopped before the capture was there to halt
            cap.halt()
        r = self.result
        t_start = last_print = time.perf_counter()
        t_read = time.perf_counter()
        status = "finished"
        try:
            for frame in cap:
                r.stage_seconds["read"] += time.perf_counter() - t_read
                if frame.index < self.source.start:  # a source that cannot seek: already recorded
                    continue
                while self.paused and not self._stop:  # paused from the screen: a camera's frames are dropped
                    time.sleep(0.05)
                if self._stop:
                    status = "stopped"
                    break
                cells = self.process(frame)
                r.frames += 1
                if self.on_frame is not None:  # the screen's live view: a reference, no work in this loop
                    self.on_frame(frame, cells)
                if not self.cfg.headless:
                    self._show(frame, cells)
                now = time.perf_counter()
                if self.cfg.headless and now - last_print >= self.cfg.print_every_s:
                    last_print = now
                    self.echo(f"[{r.frames} frames, {r.frames / (now - t_start):.1f} fps] {self.diff.summary()}")
                if self._stop:  # a signal or the window's q: honoured before anything else
                    status = "stopped"
                    break
                if self.diff.done:
                    self.echo(f"target of {self.cfg.target} cells reached")
                    break
                if self.cfg.max_frames and r.frames >= self.cfg.max_frames:
                    break
                t_read = time.perf_counter()
        except StorageFull as e:
            status, r.message = "disk-full", str(e)
            self.echo(f"error: {e}")
        except KeyboardInterrupt:
            status = "stopped"
        finally:
            if self._stop:  # a signal while the source was ending
                status = "stopped"
            if status == "finished" and self.cfg.target and not self.diff.done:
                status = SHORT  # the source ended before the count reached its target
            if not cap.stop():
                self.echo(
                    "warning: the camera has not answered for 2 s since the session stopped; it is released when it does"
                )
            r.dropped_frames = cap.dropped
            r.seconds = time.perf_counter() - t_start
            r.status = status
            self._judge_the_rest()
            if self.scale.diameter and self.cfg.mode == "field":  # the scale it cut at, for the report
                with contextlib.suppress(StorageFull, sqlite3.Error):
                    cut = round(self.scale.diameter, 1)
                    self.store.record_scale({**self.field_scale.to_dict(), "cell_cut_px": cut})
            self.store.close(status)
            self._write_files()
            if self._window:
                cv2.destroyWindow(self._window)
            for s, h in old.items():
                signal.signal(s, h)
        if self.source.end_reason:
            self.echo(self.source.end_reason)
            r.message = r.message or self.source.end_reason
        partial = f"; {r.partial_cells} moving cells never wholly in view, not counted" if r.partial_cells else ""
        # a resumed session's count is of the whole session; its frames here, of this run
        before = self.store.resume_after
        earlier = f" this run, after the {before + 1} recorded before" if before is not None else ""
        self.echo(
            f"session {status}: {r.frames} frame{'s' * (r.frames != 1)}{earlier} ({r.fps:.1f} fps), "
            f"{self.diff.summary()}; "
            f"{r.corrupt_frames} corrupt and {r.dropped_frames} dropped frames{partial}"
        )
        if self.diff.flagged:
            n = self.diff.flagged
            waits = "cell waits" if n == 1 else "cells wait"
            self.echo(f"{n} {waits} for review (not counted yet): bmc edge review {self.store.dir}")
        return r

    def _tally(self) -> tuple[Any, int, int]:
        return self.diff.tally(), self.result.cells, self.result.flagged

    def _back_to(self, tally: tuple[Any, int, int]) -> None:
        """The count and the session's figures as they stood before cells that were never recorded."""
        diff, self.result.cells, self.result.flagged = tally
        self.diff.back_to(diff)
        self.result.counted = self.diff.counted

    def _judge_the_rest(self) -> None:
        """The moving cells still in view when the session ends: judged on the views they had."""
        before = self._tally()
        late = [judged for t in list(self._views) for judged in self._judge(t)]
        try:
            self.store.record_late([c for c, _ in late], [cr for _, cr in late])
        except StorageFull as e:
            self._back_to(before)
            self.echo(f"error: {e}")
        self.result.counted = self.diff.counted

    def _write_files(self) -> None:
        """The folder's report, differential and tables from its database, once the session closed; a
        failure (a full disk) is said, and the database, which holds everything, stays intact."""
        from bmc.edge_app.report import ReportError, write_session_files

        try:
            write_session_files(self.store.dir)
        except (OSError, sqlite3.Error, ReportError) as e:
            self.echo(f"warning: the session's report was not written ({e}); bmc edge report {self.store.dir}")

    def _show(self, frame: Frame, cells: list[CellCall]) -> None:
        img = annotated(frame.image, cells)
        if img is None:
            return
        draw_differential(img, self.diff, self.result.fps)
        try:
            self._window = "bmc"
            cv2.imshow(self._window, img)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error:
            self.echo("no display available: continuing headless")
            self.cfg.headless, self._window = True, None
            return
        if key == ord("q"):
            self._stop = True
        elif key == ord("s"):
            path = self.store.dir / f"snapshot_{int(time.time())}.jpg"
            cv2.imwrite(str(path), img)
            self.echo(f"snapshot saved: {path}")
        elif key == ord(" "):
            while (cv2.waitKey(50) & 0xFF) not in (ord(" "), ord("q")):
                pass


def annotated(image: np.ndarray | None, cells: list[CellCall]) -> np.ndarray | None:
    """A copy of a (BGR) frame with each found cell's box and call drawn: green when counted, orange
    when set aside for review."""
    if image is None:
        return None
    img: np.ndarray = image.copy()
    for c in cells:
        colour = (0, 200, 0) if c.flag in ("", "seen") else (160, 160, 160) if c.flag == "tracking" else (0, 165, 255)
        b = c.box
        cv2.rectangle(img, (b.x, b.y), (b.x + b.w, b.y + b.h), colour, 2)
        cv2.putText(
            img,
            f"{c.label} {c.confidence:.2f}",
            (b.x, max(12, b.y - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            colour,
            1,
            cv2.LINE_AA,
        )
    return img


def draw_differential(img: np.ndarray, diff: Differential, fps: float) -> None:
    """The live differential in the window's corner: the total, each class counted so far with its
    share, the cells set aside for review, and the frame rate (drawn in place on a BGR frame)."""
    tgt = f"/{diff.target}" if diff.target else ""
    d = diff.record()
    lines = [f"{d.total}{tgt} {d.denominator} | {d.waiting} for review | {fps:.1f} fps", *d.lines(), *d.ratios()]
    h = 10 + 20 * len(lines)
    w = min(img.shape[1], 360)
    corner = img[:h, :w]
    corner[:] = (corner * 0.45).astype(img.dtype)  # a dark panel keeps the text legible on any field
    for k, text in enumerate(lines):
        cv2.putText(img, text, (8, 22 + 20 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)


def has_display() -> bool:
    """An X11 or Wayland screen this process may draw on."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def opencv_gui() -> str:
    """The window toolkit this OpenCV was built with (``"GTK3"``, ``"QT"``, …), or ``""`` for a
    headless build (``opencv-python-headless``, the edge extra's), which cannot open a window."""
    ui = getattr(cv2, "currentUIFramework", None)
    if ui is not None:
        return (ui() or "").strip()
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            value = line.split(":", 1)[1].strip()
            return "" if value.upper() == "NONE" else value
    return ""


NO_GUI_HINT = (
    "this OpenCV has no window support (opencv-python-headless, the edge extra's); for the live "
    "window use the OS's OpenCV: sudo edge_app/deploy/install.sh --screen, or "
    "pip install opencv-python in place of opencv-python-headless"
)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

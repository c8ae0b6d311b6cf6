"""A smear surveyed by moving the stage: BCCD fields side by side panned past the camera as a
video (``bmc bench pan``). Each white cell is found once, judged on a view wholly inside the frame
(not on its first, cut-off view at the edge), with the call the still field gets."""

from __future__ import annotations

import cv2

from bmc.benchmarks import pan


def test_the_pan_video_is_the_fields_side_by_side(bccd, tmp_path):
    fields = pan.pan_fields(bccd, 3)
    n = pan.make_pan_video(fields, 30, tmp_path / "p.avi")
    cap = cv2.VideoCapture(str(tmp_path / "p.avi"))
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, first = cap.read()
    cap.release()
    assert n == frames == len(range(0, 2 * 640 + 1, 30)) + 1 and ok and first.shape == (480, 640, 3)
    still = cv2.imread(str(fields[0].image))
    assert abs(first.astype(int) - still.astype(int)).mean() < 6  # MJPG's loss only


def test_a_panned_smear_gives_the_white_cells_of_the_still_fields(bccd):
    r = pan.run(bccd, speeds=(12,), n_fields=6, orientations=1)
    row = r["rows"][0]
    assert row["found"] == 6 and row["extra_detections"] == 0 and row["never_wholly_in_view"] == 0, row
    assert row["judged_on_a_whole_view"] == 6, row
    assert row["same_call_as_still"] >= 5, row

"""Joules per inference (``bmc bench energy``) on the device's power meters (:mod:`bmc.edge_app.meters`).

Energy per inference = (energy over the timed run − idle power × its duration) / inferences,
with the idle power measured in the same run. With no meter the benchmark says so: no number is
ever invented.
"""

from __future__ import annotations

import time

from bmc.edge_app.meters import (  # noqa: F401
    CsvLogMeter,
    INA2xxMeter,
    JetsonMeter,
    MeterError,
    Pi5PmicMeter,
    PowerMeter,
    RaplMeter,
    SampledMeter,
    find_meters,
    integrate,
    parse_pmic_read_adc,
)


def joules_per_inference(meter: PowerMeter, infer, n: int, idle_s: float = 3.0) -> dict:
    """Idle baseline, then ``n`` calls of ``infer()``, in one run on one meter."""
    meter.start()
    mark = getattr(meter, "mark", lambda: None)
    t_idle0 = time.time()
    time.sleep(idle_s)
    t_idle1 = time.time()
    mark()
    for _ in range(n):
        infer()
    t1 = time.time()
    mark()
    time.sleep(getattr(meter, "interval_s", 0) * 2)
    meter.stop()
    idle_w = meter.energy_j(t_idle0, t_idle1) / (t_idle1 - t_idle0)
    run_j = meter.energy_j(t_idle1, t1)
    return {
        "meter": meter.name,
        "idle_w": idle_w,
        "run_s": t1 - t_idle1,
        "run_j": run_j,
        "inferences": n,
        "avg_w": run_j / (t1 - t_idle1),
        "joules_per_inference": (run_j - idle_w * (t1 - t_idle1)) / n,
    }

"""Power meters of the device: hardware access that the edge app (``bmc edge doctor``) and the
benchmarks (``bmc bench energy``, :mod:`bmc.benchmarks.energy`) share; the device side owns it.

Readers, each against the interface the hardware really exposes:

* :class:`RaplMeter` — Intel RAPL package energy counters,
  ``/sys/class/powercap/intel-rapl:N/energy_uj`` (wrap-around at ``max_energy_range_uj`` handled);
* :class:`JetsonMeter` — the INA3221 monitors of Jetson boards through hwmon
  (``/sys/class/hwmon/hwmon*/name == ina3221``; ``inN_label``, ``inN_input`` mV,
  ``currN_input`` mA); the *total input* rail (``VDD_IN``, or ``POM_5V_IN`` on older boards), not
  a sum of rails, which would double-count;
* :class:`Pi5PmicMeter` — Raspberry Pi 5 ``vcgencmd pmic_read_adc``: volts x amps summed over the
  rails that report both (the PMIC's outputs; the 5 V input has no current channel);
* :class:`INA2xxMeter` — an INA219 or INA260 on I2C (optional ``smbus2``);
* :class:`CsvLogMeter` — a CSV log from an external USB power meter, aligned by time.

With no meter, :func:`find_meters` returns none: no number is ever invented.
"""

from __future__ import annotations

import abc
import csv
import datetime
import re
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from bmc.errors import BmcError


class MeterError(BmcError, RuntimeError):
    pass


class PowerMeter(abc.ABC):
    name = "meter"

    @abc.abstractmethod
    def energy_j(self, t0: float, t1: float) -> float:
        """Energy between two ``time.time()`` stamps of a window opened with :meth:`start`."""

    def start(self) -> None:  # noqa: B027
        pass

    def stop(self) -> None:  # noqa: B027
        pass


class SampledMeter(PowerMeter):
    """A meter that reads instantaneous power, integrated by a sampling thread (trapezoids)."""

    interval_s = 0.05

    @abc.abstractmethod
    def power_w(self) -> float: ...

    def start(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append((time.time(), self.power_w()))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def energy_j(self, t0: float, t1: float) -> float:
        return integrate(self.samples, t0, t1)


def integrate(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Trapezoidal energy (J) of (time, watts) samples over [t0, t1], interpolating the ends."""
    pts = sorted(samples)
    if len(pts) < 2 or t1 <= t0 or pts[0][0] > t0 or pts[-1][0] < t1:
        raise MeterError("power samples do not cover the measured window")

    def at(t: float) -> float:
        for (ta, pa), (tb, pb) in zip(pts, pts[1:]):
            if ta <= t <= tb:
                return pa if tb == ta else pa + (pb - pa) * (t - ta) / (tb - ta)
        raise MeterError("time outside the samples")

    inner = [(t0, at(t0))] + [p for p in pts if t0 < p[0] < t1] + [(t1, at(t1))]
    return sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(inner, inner[1:]))


class RaplMeter(PowerMeter):
    name = "intel-rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        root = Path(root)
        self.domains = sorted(d for d in root.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", d.name))
        if not self.domains:
            raise MeterError(f"{root}: no RAPL package domains")
        for d in self.domains:
            if not (d / "energy_uj").exists():
                raise MeterError(f"{d}: no energy_uj")
        self._stamps: list[tuple[float, list[int]]] = []

    def _read(self) -> list[int]:
        try:
            return [int((d / "energy_uj").read_text()) for d in self.domains]
        except PermissionError as e:
            raise MeterError(f"{e.filename}: not readable (RAPL needs root on recent kernels)") from e

    def _max(self, d: Path) -> int:
        return int((d / "max_energy_range_uj").read_text())

    def mark(self) -> None:
        self._stamps.append((time.time(), self._read()))

    def start(self) -> None:
        self._stamps = []
        self.mark()

    def energy_between(self, a: list[int], b: list[int]) -> float:
        total = 0
        for d, x, y in zip(self.domains, a, b):
            total += y - x if y >= x else y + self._max(d) - x  # the counter wrapped
        return total / 1e6

    def energy_j(self, t0: float, t1: float) -> float:
        # RAPL is a counter: the window's energy is the difference of readings taken at its ends
        a = min(self._stamps, key=lambda s: abs(s[0] - t0))
        b = min(self._stamps, key=lambda s: abs(s[0] - t1))
        return self.energy_between(a[1], b[1])


class JetsonMeter(SampledMeter):
    name = "jetson-ina3221"
    INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

    def __init__(self, root: str | Path = "/sys/class/hwmon", rail: str | None = None):
        root = Path(root)
        self.files: tuple[Path, Path] | None = None
        for hw in sorted(root.glob("hwmon*")):
            name = (hw / "name").read_text().strip() if (hw / "name").exists() else ""
            if name != "ina3221":
                continue
            for label in sorted(hw.glob("in*_label")):
                text = label.read_text().strip()
                if (rail and text == rail) or (not rail and text in self.INPUT_RAILS):
                    n = cast("re.Match[str]", re.match(r"in(\d+)_label", label.name)).group(1)
                    self.files = (hw / f"in{n}_input", hw / f"curr{n}_input")
                    self.rail = text
                    break
            if self.files:
                break
        if not self.files:
            raise MeterError(f"{root}: no ina3221 with a total input rail ({rail or ' or '.join(self.INPUT_RAILS)})")

    def power_w(self) -> float:
        files = cast("tuple[Path, Path]", self.files)  # found by __init__, which raises otherwise
        mv = float(files[0].read_text())
        ma = float(files[1].read_text())
        return mv * ma / 1e6


def parse_pmic_read_adc(text: str) -> float:
    """Watts from ``vcgencmd pmic_read_adc``: volts x amps over rails that report both."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for name, kind, value in re.findall(r"(\S+)_[AV]\s+(current|volt)\(\d+\)=([-\d.naN]+)[AV]", text):
        try:
            v = float(value)
        except ValueError:
            continue
        (amps if kind == "current" else volts)[name] = v
    rails = set(amps) & set(volts)
    if not rails:
        raise MeterError("no rail with both current and voltage in pmic_read_adc output")
    return sum(amps[r] * volts[r] for r in rails)


class Pi5PmicMeter(SampledMeter):
    name = "pi5-pmic"
    interval_s = 0.2  # vcgencmd takes ~10-20 ms

    def __init__(self, command: Iterable[str] = ("vcgencmd", "pmic_read_adc")) -> None:
        self.command = list(command)
        self.power_w()  # fails early where there is no PMIC

    def _output(self) -> str:
        try:
            return subprocess.run(self.command, capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise MeterError(f"{' '.join(self.command)}: {e}") from e

    def power_w(self) -> float:
        return parse_pmic_read_adc(self._output())


class INA2xxMeter(SampledMeter):
    """INA260 (integrated shunt; power register, 10 mW/LSB) or INA219 (external shunt: bus
    voltage 4 mV/LSB in bits 15..3, shunt voltage 10 µV/LSB, current = shunt voltage / R)."""

    name = "ina2xx"

    def __init__(
        self, chip: str = "ina260", bus: int = 1, address: int = 0x40, shunt_ohms: float = 0.1, smbus: Any = None
    ):
        if chip not in ("ina219", "ina260"):
            raise MeterError(f"unknown chip {chip!r}: ina219 or ina260")
        if smbus is None:
            try:
                from smbus2 import SMBus
            except ImportError as e:
                raise MeterError("an I2C power meter needs smbus2: pip install smbus2") from e
            smbus = SMBus(bus)
        self.chip, self.bus, self.address, self.shunt_ohms = chip, smbus, address, shunt_ohms
        self.name = chip

    def _reg(self, reg: int) -> int:
        raw: int = self.bus.read_word_data(self.address, reg)
        return ((raw & 0xFF) << 8) | (raw >> 8)  # the chips send big-endian words

    def power_w(self) -> float:
        if self.chip == "ina260":
            return self._reg(0x03) * 0.010
        bus_v = (self._reg(0x02) >> 3) * 0.004
        shunt = self._reg(0x01)
        shunt = shunt - 0x10000 if shunt & 0x8000 else shunt
        return bus_v * (shunt * 10e-6 / self.shunt_ohms)


class CsvLogMeter(PowerMeter):
    """An external USB meter's CSV log: a time column (unix seconds or ISO 8601) and either a
    ``power_w`` column or ``voltage_v`` and ``current_a`` columns."""

    name = "csv-log"

    def __init__(self, path: str | Path, offset_s: float = 0.0):
        self.path = Path(path)
        self.offset_s = offset_s
        if not self.path.is_file():
            raise MeterError(f"{self.path}: power log not found")

    def _samples(self) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        with open(self.path, newline="") as fh:
            rows = csv.DictReader(fh)
            cols = rows.fieldnames or []
            tcol = next((c for c in cols if c.lower() in ("time", "timestamp", "t", "unix_time")), None)
            if tcol is None:
                raise MeterError(f"{self.path}: no time column (time, timestamp, t or unix_time) in {cols}")
            for i, r in enumerate(rows, start=2):
                try:
                    t = _parse_time(r[tcol]) + self.offset_s
                    p = (
                        float(r["power_w"])
                        if "power_w" in r and r["power_w"]
                        else float(r["voltage_v"]) * float(r["current_a"])
                    )
                except (KeyError, ValueError) as e:
                    raise MeterError(f"{self.path}:{i}: unreadable row ({e})") from e
                out.append((t, p))
        return out

    def energy_j(self, t0: float, t1: float) -> float:
        return integrate(self._samples(), t0, t1)


def _parse_time(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return datetime.datetime.fromisoformat(s.strip()).timestamp()


def find_meters() -> list[PowerMeter]:
    """The meters this machine has, best first (none is a normal answer)."""
    found: list[PowerMeter] = []
    for make in (RaplMeter, JetsonMeter, Pi5PmicMeter):
        try:
            found.append(make())
        except (MeterError, OSError):
            continue
    return found

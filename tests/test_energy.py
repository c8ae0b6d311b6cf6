"""Power-meter readers fed recorded outputs (none of these machines has a meter)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bmc.benchmarks import energy
from bmc.benchmarks.energy import (
    CsvLogMeter,
    INA2xxMeter,
    JetsonMeter,
    MeterError,
    Pi5PmicMeter,
    RaplMeter,
    integrate,
    joules_per_inference,
    parse_pmic_read_adc,
)

FIXTURES = Path(__file__).parent / "fixtures" / "energy"


def test_pi5_pmic_sums_volts_times_amps_over_rails_with_both():
    text = (FIXTURES / "pi5_pmic_read_adc.txt").read_text()
    watts = parse_pmic_read_adc(text)
    # VDD_CORE alone: 6.22421 A x 0.861733 V
    assert watts > 6.22421 * 0.861733
    # 12 rails with both channels; EXT5V (input) and BATT have no current and are not counted
    assert watts == pytest.approx(7.23981, abs=1e-4)
    with pytest.raises(MeterError):
        parse_pmic_read_adc('error=1 error_msg="Command not registered"')


def test_pi5_meter_runs_the_command(tmp_path):
    script = tmp_path / "vcgencmd"
    script.write_text(f"#!/bin/sh\ncat {FIXTURES / 'pi5_pmic_read_adc.txt'}\n")
    script.chmod(0o755)
    m = Pi5PmicMeter(command=[str(script), "pmic_read_adc"])
    assert m.power_w() == pytest.approx(7.23981, abs=1e-4)
    with pytest.raises(MeterError):
        Pi5PmicMeter(command=[str(tmp_path / "missing")])


def _rapl_tree(root: Path, energy_uj: int, max_uj: int = 262143328850):
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text("package-0\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    sub = root / "intel-rapl:0:0"  # a sub-domain (cores): part of the package, not added again
    sub.mkdir(exist_ok=True)
    (sub / "energy_uj").write_text("5\n")


def test_rapl_counts_energy_and_handles_wrap_around(tmp_path):
    _rapl_tree(tmp_path, 262143000000)
    m = RaplMeter(tmp_path)
    assert [d.name for d in m.domains] == ["intel-rapl:0"]
    a = m._read()
    _rapl_tree(tmp_path, 1_000_000)  # wrapped past max_energy_range_uj
    b = m._read()
    assert m.energy_between(a, b) == pytest.approx((262143328850 - 262143000000 + 1_000_000) / 1e6)
    with pytest.raises(MeterError, match="no RAPL"):
        RaplMeter(tmp_path / "empty")


def _jetson_tree(root: Path, labels, mv, ma):
    hw = root / "hwmon3"
    hw.mkdir(parents=True)
    (root / "hwmon0").mkdir()
    (root / "hwmon0" / "name").write_text("cpu_thermal\n")
    (hw / "name").write_text("ina3221\n")
    for i, (label, v, c) in enumerate(zip(labels, mv, ma), start=1):
        (hw / f"in{i}_label").write_text(label + "\n")
        (hw / f"in{i}_input").write_text(f"{v}\n")
        (hw / f"curr{i}_input").write_text(f"{c}\n")


def test_jetson_reads_the_total_input_rail_not_a_sum(tmp_path):
    # Orin Nano: VDD_IN is the board's input; the other rails are inside it
    _jetson_tree(tmp_path, ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"], [5064, 5064, 5064], [1248, 408, 512])
    m = JetsonMeter(tmp_path)
    assert m.rail == "VDD_IN" and m.power_w() == pytest.approx(5.064 * 1.248)
    with pytest.raises(MeterError):
        JetsonMeter(tmp_path, rail="VDD_GPU")


def test_ina260_and_ina219_registers():
    class Bus:
        def __init__(self, regs):
            self.regs = regs

        def read_word_data(self, addr, reg):
            v = self.regs[reg]
            return ((v & 0xFF) << 8) | (v >> 8)  # SMBus delivers the big-endian word byte-swapped

    assert INA2xxMeter("ina260", smbus=Bus({0x03: 412})).power_w() == pytest.approx(4.12)
    # INA219: bus 5.0 V (1250 << 3), shunt 12.5 mV (1250 x 10 µV) over 0.1 Ω → 0.125 A
    m = INA2xxMeter("ina219", smbus=Bus({0x02: 1250 << 3, 0x01: 1250}), shunt_ohms=0.1)
    assert m.power_w() == pytest.approx(5.0 * 0.125)


def test_csv_log_is_aligned_by_time(tmp_path):
    log = tmp_path / "meter.csv"
    t = 1_700_000_000.0
    log.write_text("time,voltage_v,current_a\n" + "".join(f"{t + i},5.0,{0.4 if i < 5 else 0.8}\n" for i in range(11)))
    m = CsvLogMeter(log)
    assert m.energy_j(t + 1, t + 4) == pytest.approx(3 * 2.0)
    assert m.energy_j(t + 6, t + 10) == pytest.approx(4 * 4.0)
    with pytest.raises(MeterError, match="do not cover"):
        m.energy_j(t - 5, t + 1)


def test_joules_per_inference_subtracts_idle_power():
    class Replayed(energy.SampledMeter):
        """Power as a recorded profile: 2 W idle, 5 W while busy."""

        name = "replayed"
        interval_s = 0.01
        busy = False

        def power_w(self):
            return 5.0 if self.busy else 2.0

    m = Replayed()

    def work():
        m.busy = True
        time.sleep(0.01)

    r = joules_per_inference(m, work, 20, idle_s=0.3)
    assert r["idle_w"] == pytest.approx(2.0, abs=0.05)
    # 3 W above idle for ~10 ms each
    assert r["joules_per_inference"] == pytest.approx(3.0 * r["run_s"] / 20, rel=0.15)


def test_no_meter_here_means_no_number(monkeypatch):
    from bmc.edge_app import meters

    monkeypatch.setattr(meters, "RaplMeter", lambda: (_ for _ in ()).throw(MeterError("none")))
    monkeypatch.setattr(meters, "JetsonMeter", lambda: (_ for _ in ()).throw(MeterError("none")))
    monkeypatch.setattr(meters, "Pi5PmicMeter", lambda: (_ for _ in ()).throw(MeterError("none")))
    assert energy.find_meters() == []


def test_integrate_interpolates_window_ends():
    s = [(0.0, 1.0), (1.0, 3.0)]
    assert integrate(s, 0.0, 1.0) == pytest.approx(2.0)
    assert integrate(s, 0.5, 1.0) == pytest.approx(0.5 * (2.0 + 3.0) / 2)

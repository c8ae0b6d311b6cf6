"""A description of the machine a benchmark ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
import resource


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        return open("/proc/device-tree/model").read().strip("\x00 \n")
    except OSError:
        return platform.processor() or platform.machine()


def runtime_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in (
        "ai-edge-litert",
        "tflite-runtime",
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorflow",
        "keras",
        "opencv-python",
        "opencv-python-headless",
        "numpy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "runtimes": runtime_versions(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

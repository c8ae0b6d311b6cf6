"""``bmc bench latency``: per-image latency, throughput, start-up time, memory and size of models.

Every model is timed in one process run and the runs are interleaved (model A, B, C, A, B, C, …)
so that machine drift — thermal throttling, a background job — hits all of them equally.
Latency is measured with ``time.perf_counter`` around one invocation on one preprocessed cell;
throughput with the largest batch the model allows (up to ``batch``). Peak resident memory is
measured in a fresh subprocess per model (load + 20 inferences), so models do not inflate each
other's figure.

``--baseline-keras`` adds the seed's way to deploy: the float Keras model of the same
architecture and input size, called per image with ``model.predict`` as the seed's notebook does.
Latency does not depend on weight values, so an untrained model of the same architecture is a
fair baseline when no ``.keras`` file is given.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bmc.benchmarks import machine


@dataclasses.dataclass
class Row:
    model: str
    format: str
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_ips: float
    init_ms: float
    peak_rss_mb: float
    size_mb: float
    batch: int = 1
    runtime: str = ""
    accuracy: float | None = None  # on the held-out split, with ``split``


class _Onnx:
    """An ``.onnx`` file in ONNX Runtime, on the best execution provider the machine has."""

    runtime = "onnxruntime"

    def __init__(self, path, threads):
        from bmc.edge_app.backends.onnxrt import OnnxRuntimeBackend

        self.b = OnnxRuntimeBackend(str(path), threads)
        self.size = self.b.input_shape[1]
        v = _variant_from_card(path) or "fp32"
        self.format = f"onnx-{v} ({self.b.provider.removesuffix('ExecutionProvider')})"

    def one(self, x):
        return self.b.predict(x)

    def batch(self, x):
        return self.b.predict(x)


class _TFLite:
    runtime = "litert"

    def __init__(self, path, threads):
        from bmc.edge_app.backends.litert import LiteRTBackend

        self.b = LiteRTBackend(str(path), threads)
        self.size = self.b.input_shape[1]
        v = "int8" if self.b.input_dtype in (np.uint8, np.int8) else None
        if v is None:
            v = _variant_from_card(path) or "fp32"
        self.format = f"tflite-{v}"

    def one(self, x):
        return self.b.predict(x)

    def batch(self, x):
        return self.b.predict(x)


def _variant_from_card(path) -> str | None:
    from bmc.card import card_path, read_card

    if card_path(path).is_file():
        v = str(read_card(path).get("variant", "")).removeprefix("onnx-")
        return {"float32": "fp32", "float16": "fp16", "dynamic": "dynamic", "int8": "int8"}.get(v)
    return None


class _Keras:
    format = "keras-float"
    runtime = "keras"

    def __init__(self, model):
        self.m = model
        self.size = int(model.input_shape[1])

    def one(self, x):
        return self.m.predict(x, verbose=0)  # the seed's per-image call

    def batch(self, x):
        return self.m.predict(x, verbose=0, batch_size=len(x))


def keras_baseline(like: str | None, input_size: int = 224, classes: int = 8):
    import keras

    if like and like.endswith(".keras"):
        return keras.models.load_model(like), like
    from bmc.contract import Contract
    from bmc.train.model import build_classifier

    c = Contract(labels=tuple(f"c{i}" for i in range(classes)), input_size=input_size)
    return build_classifier(
        "efficientnet_lite0", c, weights="none"
    ), "efficientnet_lite0 (untrained, same architecture)"


def _rss_subprocess(path: str, threads: int) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of this (large)
    # process would report our peak rather than its own
    code = (
        "import sys, numpy as np, resource\n"
        "from bmc.benchmarks.latency import _load\n"
        f"m, _ = _load({path!r}, {threads})\n"
        "x = np.random.default_rng(0).uniform(0, 255, (1, m.size, m.size, 3)).astype(np.float32)\n"
        "for _ in range(20): m.one(x)\n"
        "from bmc.benchmarks.machine import peak_rss_mb\n"
        "print(peak_rss_mb())\n"
    )
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        return float(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def _load(path: str, threads: int):
    t0 = time.perf_counter()
    if path.endswith(".tflite"):
        m = _TFLite(path, threads)
    elif path.endswith(".onnx"):
        m = _Onnx(path, threads)
    elif path.endswith(".keras") or path == "keras-baseline":
        model, _ = keras_baseline(None if path == "keras-baseline" else path)
        m = _Keras(model)
    else:
        raise ValueError(f"{path}: unsupported model (use .tflite, .onnx or .keras)")
    return m, (time.perf_counter() - t0) * 1000


def run(
    models: list[str],
    threads: int | None = None,
    runs: int = 200,
    warmup: int = 10,
    batch: int = 8,
    baseline_keras: bool = False,
    keras_runs: int | None = None,
    measure_rss: bool = True,
    split: str | Path | None = None,
    limit: int | None = None,
) -> dict:
    """``split``: a split.json whose held-out test part each model (not the Keras baseline) is
    scored on, one orientation, as ``bmc evaluate`` does (``limit``: an even sample of it)."""
    threads = threads or os.cpu_count() or 1
    paths = list(models) + (["keras-baseline"] if baseline_keras else [])
    loaded = []
    for p in paths:
        m, init_ms = _load(p, threads)
        loaded.append((p, m, init_ms))
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {p: [] for p in paths}
    xs = {p: rng.uniform(0, 255, (1, m.size, m.size, 3)).astype(np.float32) for p, m, _ in loaded}
    for p, m, _ in loaded:
        for _ in range(warmup):
            m.one(xs[p])
    slow_runs = keras_runs or max(20, runs // 5)
    for i in range(runs):
        for p, m, _ in loaded:  # interleaved
            if isinstance(m, _Keras) and i >= slow_runs:
                continue
            t0 = time.perf_counter()
            m.one(xs[p])
            times[p].append((time.perf_counter() - t0) * 1000)
    rows = []
    for p, m, init_ms in loaded:
        xb = np.repeat(xs[p], batch, axis=0)
        m.batch(xb)
        t0 = time.perf_counter()
        reps = 3 if isinstance(m, _Keras) else 10
        for _ in range(reps):
            m.batch(xb)
        tput = reps * batch / (time.perf_counter() - t0)
        t = np.array(times[p])
        size = Path(p).stat().st_size / 1e6 if Path(p).is_file() else float("nan")
        if isinstance(m, _Keras) and not Path(p).is_file():
            size = float(sum(np.prod(w.shape) for w in m.m.weights) * 4 / 1e6)
        rss = _rss_subprocess(p, threads) if measure_rss else float("nan")
        acc = _accuracy(p, m, split, limit) if split and not isinstance(m, _Keras) else None
        rows.append(
            Row(
                Path(p).name if Path(p).is_file() else p,
                m.format,
                threads,
                *(float(np.percentile(t, q)) for q in (50, 90, 99)),
                tput,
                init_ms,
                rss,
                size,
                batch,
                m.runtime,
                acc,
            )
        )
    return {"machine": machine.describe(), "runs": runs, "rows": [dataclasses.asdict(r) for r in rows]}


def _accuracy(path: str, m, split, limit: int | None) -> float:
    from bmc.card import load_card
    from bmc.contract import preprocess, read_image
    from bmc.train.data import load_split

    _, contract = load_card(path)
    test = load_split(split)["test"]
    if limit:
        test = test[:: max(1, len(test) // limit)][:limit]
    index = {l: i for i, l in enumerate(contract.labels)}
    right = 0
    for i in range(0, len(test), 16):
        part = test[i : i + 16]
        xs = np.stack([preprocess(read_image(str(s.path)), contract, "BGR") for s in part]).astype(np.float32)
        right += int((m.batch(xs).argmax(1) == np.array([index[s.label] for s in part])).sum())
    return right / len(test)


def markdown(result: dict) -> str:
    lines = [
        "| model | runtime | format | threads | p50 ms | p90 ms | p99 ms | img/s batch 1 | img/s (batch) | init ms "
        "| peak RSS MB | size MB | accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        acc = "—" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
        lines.append(
            f"| {r['model']} | {r.get('runtime', '')} | {r['format']} | {r['threads']} | {r['p50_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {1000 / r['p50_ms']:.1f} | {r['throughput_ips']:.1f} ({r['batch']}) | "
            f"{r['init_ms']:.0f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.2f} | {acc} |"
        )
    m = result["machine"]
    lines.append(
        f"\n{m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["runtimes"].items())
    )
    return "\n".join(lines)

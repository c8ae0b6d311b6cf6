"""``bmc bench compare``: accuracy beside speed for every variant, and the Pareto front.

For each model (the ``.tflite`` variants of a conversion folder, or files given), accuracy and
macro-F1 on DATA (class folders) next to the p50 latency measured in the same run, and a PNG of
accuracy against latency that marks the variants no other beats on both.
"""

from __future__ import annotations

from pathlib import Path


def models_of(items) -> list[str]:
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            tfl = p / "tflite" if (p / "tflite").is_dir() else p
            out += sorted(str(f) for f in tfl.glob("*.tflite"))
        else:
            out.append(str(p))
    if not out:
        raise FileNotFoundError(f"no .tflite models in {', '.join(map(str, items))}")
    return out


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is at least as fast and as
    accurate, and strictly better in one."""
    flags = []
    for i, (li, ai) in enumerate(points):
        dominated = any((lj <= li and aj >= ai) and (lj < li or aj > ai) for j, (lj, aj) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def run(items, data: str, runs: int = 100, threads: int | None = None, plot: str | None = None) -> dict:
    from bmc.benchmarks import latency, machine
    from bmc.train.evaluate import evaluate

    models = models_of(items)
    lat = {r["model"]: r for r in latency.run(models, threads, runs, measure_rss=False)["rows"]}
    rows = []
    for m in models:
        e = evaluate(m, data).metrics
        l = lat[Path(m).name]
        rows.append(
            {
                "model": Path(m).name,
                "format": l["format"],
                "accuracy": e.accuracy,
                "macro_f1": e.macro_f1,
                "n": e.n,
                "p50_ms": l["p50_ms"],
                "size_mb": l["size_mb"],
            }
        )
    for r, front in zip(rows, pareto([(r["p50_ms"], r["accuracy"]) for r in rows])):
        r["pareto"] = front
    if plot:
        _plot(rows, plot)
    return {"machine": machine.describe(), "data": data, "rows": rows}


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(
            r["p50_ms"],
            100 * r["accuracy"],
            s=60,
            marker="o" if r["pareto"] else "x",
            color="tab:blue" if r["pareto"] else "tab:gray",
        )
        ax.annotate(
            r["format"], (r["p50_ms"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    front = sorted((r["p50_ms"], 100 * r["accuracy"]) for r in rows if r["pareto"])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:blue", lw=1, label="Pareto front")
    ax.set_xlabel("p50 latency per cell (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res) -> str:
    lines = [
        "| model | format | accuracy | macro-F1 | p50 ms | size MB | Pareto |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['p50_ms']:.2f} | "
            f"{r['size_mb']:.2f} | {'yes' if r['pareto'] else ''} |"
        )
    return "\n".join(lines)

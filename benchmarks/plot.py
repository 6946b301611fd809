"""Plot the saved benchmark results into ``docs/img/`` (PNG).

Reads ``benchmarks/results/{startup,failure,scale,import}.json`` (whichever exist) and
writes one figure per benchmark. Needs matplotlib, a benchmark-only dependency
(``.venv/bin/pip install matplotlib``); distruntime itself does not depend on it.

Usage::

    python benchmarks/plot.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS

IMG = REPO / "docs" / "img"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: .venv/bin/pip install matplotlib") from None

    IMG.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    startup = _load("startup")
    if startup:
        rows = startup["results"]
        ns = [r["n"] for r in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("raw", "raw torch"), ("runtime", "DistributedRuntime")):
            med = [r[f"{key}_median_ms"] for r in rows]
            lo = [r[f"{key}_median_ms"] - r[f"{key}_iqr_ms"][0] for r in rows]
            hi = [r[f"{key}_iqr_ms"][1] - r[f"{key}_median_ms"] for r in rows]
            left.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        left.set(xscale="log", xlabel="ranks (torchrun, one machine)",
                 ylabel="init + teardown, ms (median, IQR)", title="Start-up + teardown")
        left.set_xticks(ns, [str(n) for n in ns])
        left.legend()
        right.bar([str(n) for n in ns], [r["median_paired_ratio"] for r in rows], color="tab:green")
        right.axhline(1.03, color="tab:red", linestyle="--", label="goal 1.03")
        right.axhline(1.0, color="black", linewidth=0.8)
        ratios = [r["median_paired_ratio"] for r in rows]
        right.set_ylim(min(0.9, min(ratios) - 0.02), max(1.1, max(ratios) + 0.02))
        right.set(xlabel="ranks", ylabel="DistributedRuntime / raw (median paired ratio)", title="Ratio")
        right.legend()
        fig.suptitle(f"{startup['machine']['cpus']}-core VM, no GPU; {startup['repeats']} launches x "
                     f"{startup['inner']} rounds per N; resolver: {startup.get('resolver', 'system')}",
                     fontsize=9)
        fig.tight_layout()
        written.append(IMG / "startup.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    failure = _load("failure")
    if failure:
        rows = failure["results"]
        labels = [f"{r['mode']}: {r['scenario']}" for r in rows]
        bound = failure["bound_s"]
        fig, ax = plt.subplots(figsize=(11, 5.5))
        xs = range(len(rows))
        for offset, key, label in ((-0.2, "raw", "raw torch"), (0.2, "runtime", "DistributedRuntime")):
            values = [r[key]["median_s"] if r[key]["median_s"] is not None else bound for r in rows]
            ax.bar([x + offset for x in xs], values, width=0.4, label=label)
        ax.set_xticks(list(xs), labels, fontsize=8, rotation=25, ha="right")
        ax.set(ylabel="failure -> every process exited, s (median)",
               title=f"Failure detection (N=2, timeout T={failure['timeout_s']:.0f} s; "
                     f"bars at {bound:.0f} s were killed at the bound)")
        ax.legend()
        fig.tight_layout()
        written.append(IMG / "failure.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    scale = _load("scale")
    if scale and scale["simulated"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by_launcher: dict[str, list[dict[str, Any]]] = {}
        for r in scale["simulated"]:
            by_launcher.setdefault(r["launcher"], []).append(r)
        for name, rs in by_launcher.items():
            ax.plot([r["world"] for r in rs], [r["us_per_rank"] for r in rs], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="simulated world size W (8 ranks per node)",
               ylabel="discover() per rank, us", title="Launch discovery cost per rank")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(IMG / "scale_discover.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    for path in written:
        print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    if not written:
        raise SystemExit("no results in benchmarks/results/: run the benchmarks first")


if __name__ == "__main__":
    main()

"""Import cost: ``import distruntime`` on top of ``import torch``, and the pytest plugin.

Three measurements, each repeated ``--repeats`` times with the contenders alternating:

1. In a fresh interpreter that has imported torch, the time of ``import distruntime``
   and of ``from distruntime import DistributedRuntime`` (the package imports its
   torch-dependent parts lazily, so the second is what a training script pays), timed
   in-process with ``perf_counter``; plus a per-module breakdown from ``python -X
   importtime``. Goal: <= 10 ms.
2. Wall clock of ``python -c "import torch"`` versus ``python -c "import torch; from
   distruntime import DistributedRuntime"`` (fresh processes; noisy, since torch alone
   takes 1.5-2 s here).
3. A pytest session on a one-test file with no distributed tests: the plugin loaded
   through its ``pytest11`` entry point (the default once distruntime is installed)
   versus ``-p no:distruntime``. The test reports whether torch was imported.

Usage::

    python benchmarks/bench_import.py              # 15 repeats
    python benchmarks/bench_import.py --repeats 5  # quick
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    add_resolver_flag,
    clean_env,
    iqr,
    machine,
    median,
    result_name,
    run,
    save,
    setup_resolver,
    table,
)

_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")
_RUNTIME_IMPORT = "from distruntime import DistributedRuntime"
_TRIVIAL_TEST = '''import sys


def test_arithmetic():
    print("TORCH_IMPORTED=%s" % ("torch" in sys.modules))
    assert 1 + 1 == 2
'''


def _env() -> dict[str, str]:
    """The benchmark's environment, with bytecode caching on (as for an installed package)."""
    env = clean_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def import_ms(code: str) -> float:
    """Milliseconds ``code`` takes in a fresh interpreter that has already imported torch."""
    timed = f"import time, torch; t0 = time.perf_counter(); {code}; print((time.perf_counter() - t0) * 1e3)"
    result = run([PYTHON, "-c", timed], 120, env=_env())
    if result.returncode != 0:
        raise SystemExit(f"timing {code!r} failed:\n{result.tail()}")
    return float(result.stdout.split()[-1])


def module_self_ms() -> dict[str, float]:
    """Self time of each distruntime module (``-X importtime``) behind ``DistributedRuntime``.

    Modules imported through the package's lazy ``__getattr__`` (``importlib``) get no line
    of their own, only their imports do; the in-process timing above covers them.
    """
    code = "import torch; import distruntime.runtime"
    result = run([PYTHON, "-X", "importtime", "-c", code], 120, env=_env())
    if result.returncode != 0:
        raise SystemExit(f"importtime run failed:\n{result.tail()}")
    modules: dict[str, float] = {}
    for line in result.stderr.splitlines():
        match = _IMPORTTIME.match(line)
        if match and match.group(4).startswith("distruntime"):
            modules[match.group(4)] = int(match.group(1)) / 1e3
    return modules


def wall_once(code: str) -> float:
    result = run([PYTHON, "-c", code], 120, env=_env())
    if result.returncode != 0:
        raise SystemExit(f"python -c {code!r} failed:\n{result.tail()}")
    return result.seconds


def pytest_once(folder: Path, disable: bool) -> tuple[float, bool]:
    cmd = [PYTHON, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_trivial.py"]
    if disable:
        cmd[4:4] = ["-p", "no:distruntime"]
    result = run(cmd, 120, env=_env(), cwd=folder)
    if result.returncode != 0:
        raise SystemExit(f"pytest failed:\n{result.tail()}")
    return result.seconds, "TORCH_IMPORTED=True" in result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs per contender (default: 15)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/import.json")
    add_resolver_flag(parser)
    args = parser.parse_args()
    resolver = setup_resolver(args)

    totals: list[float] = []
    runtime_totals: list[float] = []
    per_module: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {"torch": [], "torch+distruntime": []}
    sessions: dict[str, list[float]] = {"plugin": [], "no plugin": []}
    torch_in_session: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="drt-import-") as tmp:
        folder = Path(tmp)
        (folder / "test_trivial.py").write_text(_TRIVIAL_TEST)
        (folder / "pytest.ini").write_text("[pytest]\n")  # keep this repo's settings out
        # Untimed: write fresh bytecode for every module involved (a stale .pyc would put
        # compile time into the first measurements; PYTHONDONTWRITEBYTECODE is dropped).
        wall_once("import torch, distruntime.testing.plugin; from distruntime import DistributedRuntime")
        pytest_once(folder, disable=False)
        for i in range(args.repeats):
            total = import_ms("import distruntime")
            totals.append(total)
            runtime_total = import_ms("from distruntime import DistributedRuntime")
            runtime_totals.append(runtime_total)
            for name, ms in module_self_ms().items():
                per_module.setdefault(name, []).append(ms)
            order = ["torch", "torch+distruntime"] if i % 2 == 0 else ["torch+distruntime", "torch"]
            for name in order:
                code = "import torch" if name == "torch" else f"import torch; {_RUNTIME_IMPORT}"
                walls[name].append(wall_once(code))
            for name in (["plugin", "no plugin"] if i % 2 == 0 else ["no plugin", "plugin"]):
                seconds, torch_loaded = pytest_once(folder, disable=name == "no plugin")
                sessions[name].append(seconds)
                torch_in_session[name] = torch_loaded
            print(f"repeat {i + 1}/{args.repeats}: importtime {total:.1f} ms, with the runtime "
                  f"{runtime_total:.1f} ms", file=sys.stderr)

    paired_wall = [b - a for a, b in zip(walls["torch"], walls["torch+distruntime"], strict=True)]
    paired_session = [b - a for a, b in zip(sessions["no plugin"], sessions["plugin"], strict=True)]
    payload: dict[str, Any] = {
        "machine": machine(),
        "resolver": resolver,
        "repeats": args.repeats,
        "importtime_ms": totals,
        "importtime_median_ms": median(totals),
        "importtime_iqr_ms": list(iqr(totals)),
        "importtime_runtime_ms": runtime_totals,
        "importtime_runtime_median_ms": median(runtime_totals),
        "importtime_runtime_iqr_ms": list(iqr(runtime_totals)),
        "modules_self_median_ms": {k: median(v) for k, v in sorted(per_module.items())},
        "wall_s": walls,
        "wall_median_s": {k: median(v) for k, v in walls.items()},
        "wall_paired_median_ms": median(paired_wall) * 1e3,
        "pytest_s": sessions,
        "pytest_median_s": {k: median(v) for k, v in sessions.items()},
        "pytest_paired_median_ms": median(paired_session) * 1e3,
        "pytest_torch_imported": torch_in_session,
    }

    print(table(["measure", "median", "IQR / note"], [
        ["`import distruntime` after `import torch`", f"{median(totals):.1f} ms",
         "{:.1f}-{:.1f} ms".format(*iqr(totals))],
        ["`from distruntime import DistributedRuntime` after `import torch`",
         f"{median(runtime_totals):.1f} ms",
         "{:.1f}-{:.1f} ms".format(*iqr(runtime_totals))],
        ["wall: python -c 'import torch'", f"{median(walls['torch']) * 1e3:.0f} ms", ""],
        [f"wall: python -c 'import torch; {_RUNTIME_IMPORT}'",
         f"{median(walls['torch+distruntime']) * 1e3:.0f} ms",
         f"paired difference {payload['wall_paired_median_ms']:+.0f} ms"],
        ["pytest, trivial file, -p no:distruntime", f"{median(sessions['no plugin']) * 1e3:.0f} ms",
         f"torch imported: {torch_in_session.get('no plugin')}"],
        ["pytest, trivial file, plugin loaded (default)", f"{median(sessions['plugin']) * 1e3:.0f} ms",
         f"torch imported: {torch_in_session.get('plugin')}; paired difference "
         f"{payload['pytest_paired_median_ms']:+.0f} ms"],
    ]))
    print()
    print(table(["module", "self time, median (ms)"],
                [[k, f"{v:.2f}"] for k, v in sorted(payload["modules_self_median_ms"].items(),
                                                     key=lambda kv: -kv[1])]))
    if not args.no_save:
        print(f"saved {save(result_name('import', resolver), payload)}", file=sys.stderr)


if __name__ == "__main__":
    main()

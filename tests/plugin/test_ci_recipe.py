"""docs/testing.md's "CI recipe", run as written: its files, then its two jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from inner_pytest import _DROPPED, kill_tree

pytestmark = pytest.mark.processes

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def _recipe() -> tuple[dict[str, str], list[str]]:
    """The section's files (a `path`: line, then a block) and its bash blocks, in order."""
    text = DOC.read_text()
    section = text.split("\n## CI recipe\n", 1)[1].split("\n## ", 1)[0]
    files: dict[str, str] = {}
    scripts: list[str] = []
    for match in re.finditer(r"(?:^`([\w./-]+)`:\n\n)?^```(\w+)(?: file)?\n(.*?)^```$", section, re.M | re.S):
        path, lang, body = match.groups()
        if path:
            files[path] = body
        elif lang == "bash":
            scripts.append(body)
    return files, scripts


def test_recipe_is_complete() -> None:
    files, scripts = _recipe()
    assert set(files) == {"pyproject.toml", "mypkg/__init__.py", "tests/test_mean.py"}
    assert len(scripts) == 2 and all("python -m pytest" in s for s in scripts)


def test_ci_recipe_runs_as_written(tmp_path: Path) -> None:
    files, scripts = _recipe()
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is this venv's
    env["COLUMNS"] = "200"
    outputs = []
    for script in scripts:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, _ = proc.communicate()
            pytest.fail(f"the recipe's job ran past 300 s:\n{out[-6000:]}")
        assert proc.returncode == 0, out[-6000:]
        outputs.append(out)
    for job, out in zip(("cpu", "gpu"), outputs, strict=True):
        # global_mean's body runs only inside rank processes, and is counted.
        row = next(line for line in out.splitlines() if line.startswith("mypkg/__init__.py"))
        assert row.split()[1:] == ["6", "0", "100%"], out
        junit = ET.parse(tmp_path / f"reports/junit-{job}.xml").getroot()
        cases = {c.get("name"): c for c in junit.iter("testcase")}
        assert set(cases) == {"test_global_mean[ws2]", "test_global_mean[ws4]", "test_global_mean_on_gpus"}
        skipped = cases["test_global_mean_on_gpus"].find("skipped")
        assert skipped is not None and "backend 'nccl' needs 2 CUDA devices, 0 visible" in skipped.get(
            "message", ""), out
        assert (tmp_path / f"reports/coverage-{job}.xml").is_file()
    assert "2 passed, 1 skipped" in outputs[0].strip().splitlines()[-1], outputs[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".coverage")) == [".coverage"]

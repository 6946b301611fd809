"""The pytest internals the plugin relies on, checked against the running pytest.

Every private pytest name the plugin uses goes through
``distruntime.testing._pytest_compat``; each test here exercises one of them on this
pytest, so a pytest release that breaks one fails here, by name, rather than as odd
behaviour in a rank. ``test_supported_pytest_releases`` runs this file (and a real
plugin session) under the oldest and the newest supported pytest.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from distruntime.testing import _pytest_compat
from distruntime.testing._pytest_compat import SUPPORTED_PYTEST, PytestCompatError

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = ROOT / "src" / "distruntime" / "testing"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ == "test_pseudo_argument":
        _pytest_compat.add_pseudo_argument(metafunc, "_pseudo")
        metafunc.parametrize("_pseudo", [3], ids=["p3"])


def test_this_pytest_is_supported() -> None:
    assert Version(pytest.__version__) in SpecifierSet(SUPPORTED_PYTEST[0]), (
        f"pytest {pytest.__version__} is outside the declared range {SUPPORTED_PYTEST[0]}"
    )
    for version in SUPPORTED_PYTEST[1]:
        assert Version(version) in SpecifierSet(SUPPORTED_PYTEST[0])


def test_no_private_pytest_name_outside_the_adapter() -> None:
    """No ``_pytest`` import, and none of the internals, anywhere but the adapter."""
    internals = {"_setupstate", "callspec", "_tmp_path_factory", "option", "fixturenames"}
    offenders = []
    for path in sorted(PLUGIN_SOURCES.glob("*.py")):
        if path.name == "_pytest_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "_pytest" or m.startswith("_pytest.") for m in modules):
                offenders.append(f"{path.name}:{node.lineno}: imports {modules}")
            if isinstance(node, ast.Attribute) and node.attr in internals:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert offenders == []


def test_teardown_exact(request: pytest.FixtureRequest) -> None:
    # Torn down to what this very item shares: nothing, but the internal is exercised.
    _pytest_compat.teardown_exact(request.session, request.node)
    with pytest.raises(PytestCompatError, match=r"no Session._setupstate.teardown_exact.*Supported pytest"):
        _pytest_compat.teardown_exact(object(), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("x", [7])
def test_callspec_params(request: pytest.FixtureRequest, x: int) -> None:
    assert _pytest_compat.callspec_params(request.node) == {"x": 7}


def test_callspec_params_unparametrized(request: pytest.FixtureRequest) -> None:
    assert _pytest_compat.callspec_params(request.node) == {}


def test_pseudo_argument(request: pytest.FixtureRequest) -> None:
    assert request.node.name == "test_pseudo_argument[p3]"
    assert _pytest_compat.callspec_params(request.node) == {"_pseudo": 3}


def test_move_fixture_first(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _pytest_compat.move_fixture_first(request.node, "tmp_path")
    assert request.node.fixturenames[0] == "tmp_path"


def test_option_names_the_controller_forwards(request: pytest.FixtureRequest) -> None:
    # config.getoption raises ValueError for a name this pytest does not define.
    for dest in ("importmode", "capture", "tbstyle", "assertmode", "plugins", "override_ini",
                 "pythonwarnings", "showlocals", "confcutdir", "noconftest", "log_level", "verbose",
                 "showcapture", "usepdb", "durations"):
        request.config.getoption(dest)


def _pytest_release(version: str) -> Path:
    """pytest ``version`` installed (once) in a directory that shadows the venv's pytest."""
    target = Path(sys.prefix) / "pytest-releases" / version
    if not (target / "pytest").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
             f"pytest=={version}"],
            check=True, timeout=300,
        )
    return target


# The release this suite runs under is tested by the suite itself.
_OTHER_RELEASES = [v for v in SUPPORTED_PYTEST[1] if v != pytest.__version__]


@pytest.mark.processes
@pytest.mark.parametrize("version", _OTHER_RELEASES)
def test_supported_pytest_releases(version: str) -> None:
    """The adapter checks and a real N-rank session under the oldest and newest pytest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_CORE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(_pytest_release(version)), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
            "tests/plugin/test_pytest_compat.py", "-k", "not test_supported_pytest_releases",
            "tests/plugin/test_ci.py::test_junit_xml_and_durations"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    probe = subprocess.run([sys.executable, "-c", "import pytest; print(pytest.__version__)"], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
    assert probe.stdout.strip() == version
    summary = out.strip().splitlines()[-1]  # 8 checks here, 1 real plugin session
    assert summary.startswith("9 passed") and "failed" not in summary, out[-3000:]

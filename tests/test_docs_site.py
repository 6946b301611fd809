"""The documentation site: built by ``bash scripts/docs.sh`` without a warning, with a
reference entry for every public name, fixture, marker, option, ini key, CLI flag and
exception, a troubleshooting anchor per exception class, and pages that render in a real
browser (headless Chromium; screenshots kept in docs/_build/screenshots/)."""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distruntime
import distruntime.init_utils
from distruntime.cli import _parser
from distruntime.troubleshooting import ENTRIES

pytest.importorskip("sphinx", reason="the docs extra (pip install -e '.[docs]')")
from sphinx.util.inventory import InventoryFile

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "docs" / "_build" / "html"
SHOTS = ROOT / "docs" / "_build" / "screenshots"
# Chromium is mandatory in CI (scripts/launchers/install.sh installs it); a developer's
# machine without it skips the browser tests.
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def site() -> Path:
    """The site, built by the README's command (strict: any warning fails it)."""
    proc = _run(["bash", "scripts/docs.sh"], ROOT, timeout=600)
    assert proc.returncode == 0, f"scripts/docs.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "no warnings" in proc.stderr, proc.stderr[-3000:]
    return HTML


@pytest.fixture(scope="module")
def inventory(site: Path) -> dict[str, set[str]]:
    """objects.inv as {role: {names}}: what the site has a reference entry for."""
    with (site / "objects.inv").open("rb") as stream:
        inv = InventoryFile.load(stream, "", lambda base, uri: uri)
    data = inv.data if hasattr(inv, "data") else inv  # Sphinx >= 8.2: an _Inventory object
    return {role: set(entries) for role, entries in data.items()}


def test_a_warning_fails_the_build(tmp_path: Path) -> None:
    """The build's flags: a broken cross-reference or a dead internal link is an error."""
    (tmp_path / "index.md").write_text(
        "# Probe\n\nSee {py:func}`distruntime.no_such_function` and [a page](missing.md).\n")
    proc = _run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q",
                 "-c", str(ROOT / "docs"), str(tmp_path), str(tmp_path / "_out")], ROOT)
    assert proc.returncode != 0
    assert "distruntime.no_such_function" in proc.stderr, proc.stderr
    assert "missing.md" in proc.stderr or "missing" in proc.stderr, proc.stderr


def test_every_public_name_has_an_entry(inventory: dict[str, set[str]]) -> None:
    py = set().union(*(names for role, names in inventory.items() if role.startswith("py:")))
    missing = [f"distruntime.{n}" for n in distruntime.__all__ if f"distruntime.{n}" not in py]
    missing += [f"distruntime.init_utils.{n}" for n in distruntime.init_utils.__all__
                if f"distruntime.init_utils.{n}" not in py]
    assert not missing, f"no reference entry for {missing}"


def test_every_exception_has_an_entry_with_its_fields(site: Path,
                                                      inventory: dict[str, set[str]]) -> None:
    from test_troubleshooting import _package_exceptions

    documented = inventory.get("py:exception", set())
    for name, cls in _package_exceptions().items():
        assert f"distruntime.{name}" in documented or f"{cls.__module__}.{name}" in documented, name
    errors_page = (site / "reference" / "errors.html").read_text()
    for field in ("variable", "reason", "failed_ranks", "root_reported", "report", "signum", "calls"):
        assert re.search(rf"<strong>{field}</strong>", errors_page), f"field {field} not on the errors page"


def _pytest_output(args: list[str], tmp_path: Path) -> str:
    proc = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], tmp_path, timeout=120)
    return proc.stdout


def test_every_plugin_registration_has_an_entry(inventory: dict[str, set[str]], tmp_path: Path) -> None:
    """Read from pytest itself, with the plugin and without it (``-p no:distruntime``): what
    it adds to ``--help`` (options, ini keys), ``--markers`` and ``--fixtures``."""
    def added(args: list[str], pattern: str) -> set[str]:
        with_it = set(re.findall(pattern, _pytest_output(args, tmp_path), re.M))
        without = _pytest_output([*args, "-p", "no:distruntime"], tmp_path)
        return with_it - set(re.findall(pattern, without, re.M))

    options = added(["--help"], r"^\s+(--[\w-]+)")
    ini_keys = added(["--help"], r"^\s+(\w+) \(\w+\)")
    markers = added(["--markers"], r"^@pytest\.mark\.(\w+)")
    fixtures = added(["--fixtures"], r"^(\w+)(?: \[[^]]*\])? -- ")
    assert options >= {"--drt-timeout", "--drt-report"} and "drt_timeout" in ini_keys
    assert markers == {"distributed"} and "dist_info" in fixtures
    assert {f"pytest.{o}" for o in options} <= inventory["std:cmdoption"]
    assert ini_keys <= inventory["std:pytest-ini"]
    assert markers <= inventory["std:pytest-marker"]
    assert fixtures <= inventory["std:pytest-fixture"]


def test_every_cli_flag_has_an_entry(inventory: dict[str, set[str]]) -> None:
    parser = _parser()
    programs: list[tuple[str, argparse.ArgumentParser]] = [("distruntime", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            programs += [(f"distruntime-{name}", sub) for name, sub in action.choices.items()]
    assert {p for p, _ in programs} >= {"distruntime-env", "distruntime-doctor", "distruntime-where",
                                        "distruntime-explain"}
    missing = []
    for program, sub in programs:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            names = action.option_strings or [str(action.metavar or action.dest)]
            missing += [f"{program} {n}" for n in names if f"{program}.{n}" not in inventory["std:cmdoption"]]
    assert not missing, f"no reference entry for {missing}"


def test_troubleshooting_has_an_anchor_per_exception(site: Path) -> None:
    page = (site / "troubleshooting.html").read_text()
    # The page renders the package's text: each entry's meaning, as a reader sees it.
    words = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())
    for name, entry in ENTRIES.items():
        assert f'id="{name.lower()}"' in page, name
        assert f"distruntime explain {name}" in words, name
        if "`" not in entry.meaning:  # plain text: compared word for word
            assert entry.meaning.lower() in words.replace("\u2019", "'").lower(), name


def test_benchmark_plots_are_pictures(site: Path) -> None:
    page = (site / "benchmarks.html").read_text()
    images = re.findall(r'<img [^>]*src="(_images/[^"]+\.png)"', page)
    assert len(images) >= 3, images
    assert all((site / src).is_file() for src in images)


# --------------------------------------------------------------------------- in a browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if CI:
        pytest.fail("chromium is not installed: scripts/launchers/install.sh installs it "
                    "(apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs this")


def _browser(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return _run(cmd, tmp_path, timeout=120)


PAGES = [
    # (page, fragment, words the title holds, an element id the page must have)
    ("index.html", "", "distruntime", "distruntime"),
    ("reference/api.html", "distruntime.DistributedRuntime", "distruntime", "distruntime.DistributedRuntime"),
    ("troubleshooting.html", "hangerror", "Troubleshooting", "hangerror"),
]


@pytest.mark.parametrize(("page", "fragment", "title", "anchor"), PAGES, ids=[p[0] for p in PAGES])
def test_page_renders_in_chromium(site: Path, tmp_path: Path, page: str, fragment: str, title: str,
                                  anchor: str) -> None:
    url = (site / page).as_uri() + (f"#{fragment}" if fragment else "")
    dom = _browser(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-3000:]
    text = dom.stdout
    found = re.search(r"<title>(.*?)</title>", text, re.S)
    assert found and title in html.unescape(found.group(1)), found
    assert f'id="{anchor}"' in text, f"no element #{anchor} in {page}"
    assert re.search(r'<div class="highlight[^"]*"><pre>', text), f"no code block on {page}"
    for marker in ('class="system-message"', 'class="problematic"', "Traceback (most recent call last)",
                   "ERROR/", "WARNING/"):
        assert marker not in text, f"{marker} on {page}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / (page.replace("/", "_").removesuffix(".html") + ".png")
    shot.unlink(missing_ok=True)
    proc = _browser(["--window-size=1280,1600", "--hide-scrollbars", f"--screenshot={shot}", url], tmp_path)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

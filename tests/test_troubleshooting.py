"""Every exception class the package defines has a troubleshooting entry, and
``distruntime explain`` prints it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import distruntime
from distruntime.cli import main
from distruntime.errors import DistRuntimeError, HangError, LaunchEnvError, SignalExit
from distruntime.troubleshooting import ENTRIES, explain, lookup


def _package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package (errors.py and anywhere else)."""
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(distruntime.__path__, "distruntime."):
        if module_info.name == "distruntime.__main__":
            continue
        module = importlib.import_module(module_info.name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                found[obj.__name__] = obj
    return found


def test_every_exception_class_has_an_entry() -> None:
    classes = _package_exceptions()
    assert "HangError" in classes and "PytestCompatError" in classes  # the walk reaches subpackages
    assert sorted(set(classes) - set(ENTRIES)) == [], "add an Entry in src/distruntime/troubleshooting.py"
    assert sorted(set(ENTRIES) - set(classes)) == [], "an entry names a class the package no longer defines"
    for name, cls in classes.items():
        assert ENTRIES[name].module == cls.__module__, name


# Raised and caught inside the package, shown as a message (a CLI line, a test report):
# they carry no note. Every other exception class must derive from DistRuntimeError.
_INTERNAL = {"WhereError", "PoolStartError", "MalformedRecord"}


def test_every_distruntime_error_points_to_its_entry() -> None:
    for name, cls in _package_exceptions().items():
        assert issubclass(cls, (DistRuntimeError, SignalExit)) or name in _INTERNAL, name
    err = LaunchEnvError("RANK='x' is not an integer", variable="RANK", value="x")
    assert err.__notes__ == ["See: distruntime explain LaunchEnvError"]
    assert str(err) == "RANK='x' is not an integer"  # the message itself is unchanged
    assert SignalExit(15).__notes__ == ["See: distruntime explain SignalExit"]
    assert HangError("a verdict").__notes__ == ["See: distruntime explain HangError"]


def test_the_note_shows_in_the_traceback() -> None:
    code = "from distruntime.errors import RendezvousError\nraise RendezvousError('no', reason='x')\n"
    proc = subprocess.run([sys.executable, "-c", code], check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.rstrip().splitlines()[-1] == "See: distruntime explain RendezvousError", proc.stderr


def test_entries_are_complete() -> None:
    for name, entry in ENTRIES.items():
        assert entry.name == name and entry.meaning and entry.causes and entry.fix, name
        assert entry.meaning.endswith("."), name


def test_lookup_accepts_dotted_and_any_case() -> None:
    assert lookup("distruntime.errors.RendezvousError") is ENTRIES["RendezvousError"]
    assert lookup("peerfailureerror") is ENTRIES["PeerFailureError"]
    with pytest.raises(KeyError, match="known: "):
        explain("NoSuchError")


def test_cli_explain_prints_the_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "HangError"]) == 0
    out = capsys.readouterr().out
    assert out == explain("HangError")
    assert out.startswith("HangError: the job stopped making progress") and "Fix:\n  1. " in out


def test_cli_explain_lists_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(ENTRIES)
    assert main(["explain", "Nope"]) == 1
    assert "Known: BackendUnavailableError" in capsys.readouterr().err

"""Sphinx extension: the reference pages generated from distruntime's real registrations.

Directives (used in docs/reference/*.rst and docs/troubleshooting.rst):

``drt-autoall`` MODULE, option ``:kind: api | exceptions``
    One autodoc entry per name in ``MODULE.__all__``, read at build time: a name another
    branch adds to ``__all__`` appears without editing a page. ``api`` skips exception
    classes, ``exceptions`` keeps only them (and, for ``distruntime``, adds every other
    exception class the package defines, under its own module).
``drt-pytest-plugin``
    The plugin's command-line options and ini keys as its ``pytest_addoption`` registers
    them (called with a recording parser), its markers as its ``pytest_configure`` adds
    them, and its fixtures as the module defines them.
``drt-cli``
    Every ``distruntime`` subcommand and flag, read from the argparse parser itself.
``drt-troubleshooting``
    One section (anchor = the class name, lower case) per :mod:`distruntime.troubleshooting`
    entry: the same text ``distruntime explain NAME`` prints.

It also fails the build for a public documented name without a docstring, and resolves
type hints that name a module-internal path (``distruntime.info.DistInfo``) to the public
entry (``distruntime.DistInfo``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

PACKAGE = "distruntime"


def _indent(text: str, prefix: str = "   ") -> list[str]:
    return [prefix + line if line.strip() else "" for line in text.splitlines()]


def _literal(text: str) -> str:
    """The troubleshooting text's `code` spans as reST inline literals."""
    return re.sub(r"`([^`]+)`", r"``\1``", text)


def _rst(directive: SphinxDirective, lines: list[str]) -> list[nodes.Node]:
    node = nodes.section()
    node.document = directive.state.document
    source = directive.get_source_info()[0]
    content = StringList()
    for i, line in enumerate(lines):
        content.append(line, source, i)
    nested_parse_with_titles(directive.state, content, node)
    return list(node.children)


def is_exception(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package: name -> class."""
    package = importlib.import_module(PACKAGE)
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        if info.name == PACKAGE + ".__main__":
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if is_exception(obj) and obj.__module__ == module.__name__:
                found[obj.__name__] = obj
    return found


# --------------------------------------------------------------------------- __all__
class AutoAll(SphinxDirective):
    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {
        "kind": lambda arg: directives.choice(arg, ("api", "exceptions", "all")),
    }

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        kind = self.options.get("kind", "all")
        self.env.note_dependency(inspect.getfile(module))
        lines: list[str] = []
        names = list(module.__all__)
        if kind == "exceptions" and module_name == PACKAGE:
            public = {name for name in names if is_exception(getattr(module, name))}
            names = sorted(public)
        for name in names:
            obj = getattr(module, name)
            if (kind == "api" and is_exception(obj)) or (kind == "exceptions" and not is_exception(obj)):
                continue
            lines += self._entry(module_name, name, obj)
        if kind == "exceptions" and module_name == PACKAGE:
            others = {n: c for n, c in package_exceptions().items() if n not in module.__all__}
            if others:
                lines += ["", "Other exceptions", "----------------", "",
                          "Exception classes defined elsewhere in the package. They reach users as "
                          "messages (a test report, a CLI line) rather than as public API.", ""]
                for name in sorted(others):
                    lines += self._entry(others[name].__module__, name, others[name])
        return _rst(self, lines)

    def _entry(self, module_name: str, name: str, obj: Any) -> list[str]:
        target = f"{module_name}.{name}"
        home = getattr(obj, "__module__", None)
        if name == "__version__":
            return [f".. py:data:: {name}", f"   :module: {module_name}", f"   :value: {obj!r}", "",
                    "   The installed distribution's version.", ""]
        if module_name != PACKAGE and home is not None and home != module_name and \
                not home.startswith(module_name + "."):
            # A re-export (init_utils.DistInfo): point at the public entry, do not repeat it.
            kind = "py:class" if inspect.isclass(obj) else "py:function"
            public = hasattr(importlib.import_module(PACKAGE), name)
            return [f".. {kind}:: {name}", f"   :module: {module_name}", "   :no-typesetting:", "",
                    f".. rubric:: ``{target}``", "",
                    f"Re-exported: :py:obj:`{PACKAGE}.{name}`." if public
                    else f"Re-exported from :py:mod:`{home}`.", ""]
        if not _documented(module_name, name, obj):
            logger.warning("%s has no docstring: every public name needs one (with an example)", target,
                           location=self.get_location())
        if is_exception(obj):
            return [f".. autoexception:: {target}", "   :members:", "   :show-inheritance:", ""]
        if inspect.isclass(obj):
            return [f".. autoclass:: {target}", "   :members:", "   :show-inheritance:", ""]
        if callable(obj):
            return [f".. autofunction:: {target}", ""]
        return [f".. autodata:: {target}", ""]


def _documented(module_name: str, name: str, obj: Any) -> bool:
    """A docstring of its own: a class's or function's, or a module constant's ``#:`` / string."""
    if inspect.isclass(obj) or callable(obj):
        return bool((inspect.getdoc(obj) or "").strip())
    from sphinx.pycode import ModuleAnalyzer

    home = module_name
    analyzer = ModuleAnalyzer.for_module(home)
    return ("", name) in analyzer.find_attr_docs()


# --------------------------------------------------------------------------- pytest plugin
class _RecordingGroup:
    def __init__(self, record: list[tuple[tuple[str, ...], dict[str, Any]]]) -> None:
        self.record = record

    def addoption(self, *names: str, **attrs: Any) -> None:
        self.record.append((names, attrs))

    _addoption = addoption


class RecordingParser:
    """Stands in for ``pytest.Parser``: records what ``pytest_addoption`` registers."""

    def __init__(self) -> None:
        self.options: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.ini: list[tuple[str, str, Any]] = []
        self.groups: list[tuple[str, str]] = []

    def getgroup(self, name: str, description: str = "", after: str | None = None) -> _RecordingGroup:
        self.groups.append((name, description))
        return _RecordingGroup(self.options)

    def addoption(self, *names: str, **attrs: Any) -> None:
        self.options.append((names, attrs))

    def addini(self, name: str, help: str, type: str | None = None, default: Any = None,
               **_: Any) -> None:
        self.ini.append((name, help, default))


class _RecordingConfig:
    """Stands in for ``pytest.Config`` in ``pytest_configure``: records ini lines (markers)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.stash: dict[Any, Any] = {}

        class _PluginManager:
            def register(self, plugin: object, name: str | None = None) -> None:
                pass

        self.pluginmanager = _PluginManager()

    def addinivalue_line(self, name: str, line: str) -> None:
        self.lines.append((name, line))


def plugin_registrations() -> dict[str, Any]:
    """The plugin's options, ini keys, markers and fixtures, from its real hooks and module."""
    plugin = importlib.import_module(f"{PACKAGE}.testing.plugin")
    parser = RecordingParser()
    plugin.pytest_addoption(parser)
    config = _RecordingConfig()
    plugin.pytest_configure(config)
    markers = []
    for name, line in config.lines:
        if name == "markers":
            signature, _, help_text = line.partition(": ")
            markers.append((signature.split("(", 1)[0], signature, help_text))
    fixtures = []
    for attr, obj in vars(plugin).items():
        definition = getattr(obj, "_pytestfixturefunction", None)  # pytest < 8.4
        if definition is None and type(obj).__name__ == "FixtureFunctionDefinition":
            definition = obj
        if definition is not None:
            fixtures.append((getattr(definition, "name", None) or attr, inspect.getdoc(obj) or ""))
    return {"options": parser.options, "ini": parser.ini, "groups": parser.groups,
            "markers": markers, "fixtures": fixtures}


class PytestPlugin(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        reg = plugin_registrations()
        self.env.note_dependency(inspect.getfile(importlib.import_module(f"{PACKAGE}.testing.plugin")))
        lines = ["Fixtures", "--------", ""]
        for name, doc in reg["fixtures"]:
            if not doc.strip():
                logger.warning("fixture %s has no docstring", name, location=self.get_location())
            lines += [f".. pytest-fixture:: {name}", "", *_indent(doc), ""]
        lines += ["Markers", "-------", ""]
        for name, signature, help_text in reg["markers"]:
            lines += [f".. pytest-marker:: {name}", "", f"   ``@pytest.mark.{signature}``", "",
                      *_indent(help_text), ""]
        lines += ["Command-line options", "--------------------", "", ".. program:: pytest", ""]
        for names, attrs in reg["options"]:
            metavar = attrs.get("metavar")
            choices = attrs.get("choices")
            arg = f" {metavar}" if metavar else (" {" + ",".join(choices) + "}" if choices else "")
            lines += [f".. option:: {', '.join(n + arg for n in names)}", ""]
            lines += _indent(attrs.get("help", ""))
            if "default" in attrs and attrs["default"] not in (None, False):
                lines += ["", f"   Default: ``{attrs['default']}``."]
            lines.append("")
        lines += ["ini keys", "--------", "",
                  "Set in ``pytest.ini``, ``tox.ini``, or ``[tool.pytest.ini_options]`` of "
                  "``pyproject.toml``; the command-line option of the same name wins.", ""]
        for name, help_text, default in reg["ini"]:
            lines += [f".. pytest-ini:: {name}", "", *_indent(help_text), "",
                      f"   Default: ``{default}``.", ""]
        return _rst(self, lines)


# --------------------------------------------------------------------------- CLI
def cli_commands() -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) for every ``distruntime`` subcommand, from the real parser."""
    cli = importlib.import_module(f"{PACKAGE}.cli")
    parser: argparse.ArgumentParser = cli._parser()
    commands = [("", parser.description or "", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            commands += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return commands


def cli_flags(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(option string(s) with metavar, help, default) of every argument but subcommands."""
    flags = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            takes = action.nargs != 0
            metavar = action.metavar or (action.dest.upper() if takes else "")
            if action.choices is not None and not action.metavar:
                metavar = "{" + ",".join(map(str, action.choices)) + "}"
            names = ", ".join(f"{s} {metavar}".rstrip() for s in action.option_strings)
        else:
            names = str(action.metavar or action.dest)
        default = "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings \
            else str(action.default)
        flags.append((names, action.help or "", default))
    return flags


class Cli(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(inspect.getfile(importlib.import_module(f"{PACKAGE}.cli")))
        lines: list[str] = []
        for name, help_text, parser in cli_commands():
            program = f"distruntime {name}".strip()
            title = f"``{program}``"
            lines += [title, "-" * len(title), "", help_text[:1].upper() + help_text[1:] + ".", "",
                      ".. code-block:: text", "", *_indent(parser.format_usage().strip()), "",
                      f".. program:: {program}", ""]
            for names, flag_help, default in cli_flags(parser):
                lines += [f".. option:: {names}", "", *_indent(flag_help or "(no help)")]
                if default and "default" not in flag_help:
                    lines += ["", f"   Default: ``{default}``."]
                lines.append("")
        return _rst(self, lines)


# --------------------------------------------------------------------------- troubleshooting
class Troubleshooting(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        module = importlib.import_module(f"{PACKAGE}.troubleshooting")
        self.env.note_dependency(inspect.getfile(module))
        public = importlib.import_module(PACKAGE)
        lines: list[str] = []
        for name in sorted(module.ENTRIES):
            entry = module.ENTRIES[name]
            target = f"{PACKAGE}.{name}" if name in public.__all__ else f"{entry.module}.{name}"
            lines += [name, "-" * len(name), "",
                      f"**{_literal(entry.meaning[:1].upper() + entry.meaning[1:])}**", "",
                      f"Class: :py:exc:`{target}`. In a terminal: ``distruntime explain {name}``.", "",
                      "Usual causes", "~~~~~~~~~~~~", ""]
            lines += [f"* {_literal(cause)}" for cause in entry.causes]
            lines += ["", "Fix", "~~~", ""]
            lines += [f"#. {_literal(step)}" for step in entry.fix]
            if entry.fields:
                lines += ["", "Fields", "~~~~~~", ""]
                lines += [f"* ``{field}``: {_literal(what)}" for field, what in entry.fields]
            lines.append("")
        return _rst(self, lines)


# --------------------------------------------------------------------------- checks and links
def _skip_member(app: Sphinx, what: str, name: str, obj: Any, skip: bool,  # noqa: PLR0917
                 options: Any) -> bool | None:
    """A public member of a documented class without a docstring fails the build."""
    if skip or name.startswith("_") or what not in ("class", "exception"):
        return None
    function = obj.fget if isinstance(obj, property) else obj
    module = getattr(function, "__module__", None) or ""
    if (module == PACKAGE or module.startswith(PACKAGE + ".")) and callable(function) \
            and not (inspect.getdoc(obj) or "").strip():
        logger.warning("public member %s has no docstring", name)
    return None


def _napoleon_without_inline_types(app: Sphinx) -> None:
    """Napoleon reads an attribute's or property's first line ``text: more`` as ``type: text``;
    the package's docstrings are prose ("The data-parallel rank (...): ``rank`` without a
    mesh"), and their types come from the annotations. Napoleon's handler is wrapped so it
    parses those docstrings like any other."""
    from sphinx.ext.napoleon import _process_docstring

    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is _process_docstring:
            app.disconnect(listener.id)

    def process(app: Sphinx, what: str, name: str, obj: Any,  # noqa: PLR0917
                options: Any, lines: list[str]) -> None:
        if what in ("attribute", "property", "data") and name.startswith(PACKAGE + "."):
            what = "function"
        _process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def _missing_reference(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """``distruntime.info.DistInfo`` (a type hint's path) -> the public ``distruntime.DistInfo``."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    short = target.rsplit(".", 1)[-1]
    public = importlib.import_module(PACKAGE)
    if not (target.startswith(PACKAGE + ".") or target == short) or short not in public.__all__:
        return None
    candidate = f"{PACKAGE}.{short}"
    if candidate == target:
        return None
    domain = env.get_domain("py")
    new = node.deepcopy()
    new["reftarget"] = candidate
    return domain.resolve_xref(env, node.get("refdoc", ""), app.builder, node["reftype"], candidate,
                               new, contnode)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("drt-autoall", AutoAll)
    app.add_directive("drt-pytest-plugin", PytestPlugin)
    app.add_directive("drt-cli", Cli)
    app.add_directive("drt-troubleshooting", Troubleshooting)
    app.add_object_type("pytest-fixture", "fixture", objname="pytest fixture",
                        indextemplate="pair: %s; pytest fixture")
    app.add_object_type("pytest-marker", "marker", objname="pytest marker",
                        indextemplate="pair: %s; pytest marker")
    app.add_object_type("pytest-ini", "ini", objname="pytest ini key",
                        indextemplate="pair: %s; pytest ini key")
    app.connect("autodoc-skip-member", _skip_member)
    _napoleon_without_inline_types(app)
    app.connect("missing-reference", _missing_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

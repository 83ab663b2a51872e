"""Every command's `--help`: each option says what it does, and its default where it has one."""

from __future__ import annotations

import argparse
import importlib

import pytest

COMMANDS = [
    "study.run",
    "study.confirm",
    "study.sync",
    "analysis.table",
    "analysis.export",
    "analysis.importance",
    "analysis.plots",
    "analysis.report",
    "analysis.compare",
    "gacd.train",
    "gacd.evaluate",
    "gacd.transfer",
]


class Captured(Exception):
    pass


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command's `main` builds, caught as it parses (nothing runs)."""
    caught = {}

    def capture(self, args=None, namespace=None):
        caught["parser"] = self
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured):
        importlib.import_module(module_name).main([])
    return caught["parser"]


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{module_name} {name}: no help"
        has_default = action.default not in (None, False, argparse.SUPPRESS, [])
        if action.option_strings and has_default and not action.required:
            assert "default" in action.help, f"{module_name} {name}: default not named"

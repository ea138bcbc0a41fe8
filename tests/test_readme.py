"""The README stays true: every flag of every command is documented, and CI runs the README's test command."""
from __future__ import annotations

import argparse
import importlib

import pytest

from conftest import REPO
from foodcap.cli import COMMANDS

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_in_the_readme(command):
    parser = importlib.import_module(f"foodcap.commands.{command}").build_parser()
    flags = [o for a in parser._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings
             if o.startswith("--")]
    missing = [f for f in flags if f"`{f}`" not in README]
    assert not missing, f"foodcap {command}: flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and 'pip install -q -e ".[test]"' in ci
    setup = [line for line in README.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(setup) == 2, "README carries exactly two set-up commands"
    assert setup[0].endswith("foodcap demo --out_dir foodcap_demo_out")
    assert setup[1].endswith("python -m pytest -q") and '.[test]' in setup[1]

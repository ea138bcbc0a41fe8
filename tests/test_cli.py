"""The console script and the three seed scripts start, print help and their version."""
from __future__ import annotations

import subprocess
import sys

import pytest

from foodcap import __version__
from foodcap.cli import COMMANDS, main

from conftest import REPO


def test_version_and_usage(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"foodcap {__version__}"
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"foodcap {name}" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["parse_food.py", "train.py", "predict.py"])
def test_seed_scripts_print_help(script):
    res = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "foodcap", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"foodcap {__version__}"

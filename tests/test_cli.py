"""The ``medssl`` command: help, argument validation and error reporting without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medssl import cli
from medssl.errors import DataError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("phantom", "pretrain", "demo"):
        assert command in result.stdout


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "usage: medssl" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("phantom", "--subjects", "0", "--out", "x"), "expected a positive integer, got 0"),
        (("phantom", "--subjects", "many", "--out", "x"), "expected a positive integer, got 'many'"),
        (("phantom", "--subjects", "2"), "the following arguments are required: --out"),
        (("pretrain", "no_such_recipe"), "invalid choice: 'no_such_recipe'"),
        (("pretrain", "cine_mae", "--set", "novalue"), "expected KEY=VALUE, got 'novalue'"),
    ],
)
def test_nonsense_arguments_are_rejected_with_a_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _replace_handler(monkeypatch, command: str, handler) -> None:
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices[command].set_defaults(handler=handler)


def test_user_errors_print_one_line_and_exit_2(monkeypatch, capsys):
    def broken(args):
        raise DataError("no NIfTI files found in /somewhere")

    _replace_handler(monkeypatch, "demo", broken)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "medssl demo: error: no NIfTI files found in /somewhere"


def test_unexpected_errors_are_summarised_unless_debug(monkeypatch, capsys):
    def buggy(args):
        raise ZeroDivisionError("division by zero")

    _replace_handler(monkeypatch, "demo", buggy)
    assert cli.main(["demo"]) == 1
    assert "unexpected ZeroDivisionError: division by zero" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "demo"])

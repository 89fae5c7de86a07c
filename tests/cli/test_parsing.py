"""The CLI's own checks: bad command lines fail with exit 2 before any request is made."""

from __future__ import annotations

import argparse
import io

import pytest

from rexec.client.cli import duration, main
from tests.support import free_port

# Nothing listens here: a command that reached the network would fail with exit 1, not 2.
UNREACHABLE = f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "--pool", "p", "m:f", "--args", "[1,"], "--args is not valid JSON"),
        (["submit", "--pool", "p", "m:f", "--args", '{"a": 1}'], "--args must be a JSON array"),
        (["submit", "--pool", "p", "m:f", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
        (["submit", "--pool", "p", "m:f", "--kwargs", "nope"], "--kwargs is not valid JSON"),
        (["submit", "--pool", "p"], "give one TARGET"),
        (["submit", "--pool", "p", "a:b", "c:d"], "give one TARGET"),
        (["submit", "--pool", "p", "--command"], "--command needs the argv"),
        (["submit", "--pool", "p", "--command", "--args", "[]", "--", "ls"], "not to --command"),
        (["submit", "--pool", "p", "m:f", "--final-exit-code", "3"], "applies to --command"),
        (["submit", "--pool", "p", "--final-exit-code", "256", "--command", "--", "x"], "1 to 255"),
        (["submit", "m:f"], "the following arguments are required: --pool"),
        (["submit", "--pool", "p", "m:f", "--timeout", "0"], "argument --timeout"),
        (["submit", "--pool", "p", "m:f", "--max-attempts", "0"], "argument --max-attempts"),
        (["token", "create", "--pool", "p", "--expires", "soon"], "invalid duration 'soon'"),
        (["tasks", "--state", "sleeping"], "invalid choice: 'sleeping'"),
        (["wait"], "the following arguments are required: ID"),
        (["pool"], "required: ACTION"),
        (["pool", "create", "p", "--max-running", "0"], "argument --max-running"),
        (["pool", "update", "p", "--max-running", "2", "--unlimited"], "not allowed with"),
        (["apikey", "create"], "the following arguments are required: --role"),
        (["apikey", "create", "--role", "root"], "invalid choice: 'root'"),
        (["apikey", "create", "--role", "viewer", "--expires", "0d"], "invalid duration"),
        (["apikey"], "required: ACTION"),
        (["audit", "--limit", "0"], "argument --limit"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_command_lines_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--api-url", UNREACHABLE, *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "usage: rexec" in captured.err
    assert captured.out == ""


def test_serve_refuses_a_short_bootstrap_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REXEC_API_KEY", "s3cret")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "REXEC_API_KEY is 6 characters long" in err and "at least 16" in err


def test_serve_warns_without_a_bootstrap_key(caplog: pytest.LogCaptureFixture) -> None:
    from rexec.dispatcher.serve import check_bootstrap_key
    from rexec.schemas.settings import load_settings

    with caplog.at_level("WARNING", logger="rexec.serve"):
        check_bootstrap_key(load_settings({}))
    assert "REXEC_API_KEY is not set: there is no bootstrap admin key" in caplog.text


def test_login_without_a_key_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["--api-url", UNREACHABLE, "login"]) == 2
    assert "no API key given" in capsys.readouterr().err


def test_json_error_names_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--pool", "p", "m:f", "--args", "oops", "--api-url", UNREACHABLE]) == 2
    assert "rexec submit: error: --args is not valid JSON" in capsys.readouterr().err


def test_unreachable_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api-url", UNREACHABLE, "tasks"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rexec: error: the rexec API at {UNREACHABLE} is unreachable")
    assert "start it with `rexec serve`" in err


def test_api_url_from_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REXEC_API_URL", UNREACHABLE)
    assert main(["pool", "list"]) == 1
    assert UNREACHABLE in capsys.readouterr().err
    # --api-url wins over the environment, before or after the subcommand.
    other = f"http://127.0.0.1:{free_port()}"
    assert main(["pool", "list", "--api-url", other]) == 1
    assert other in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "pool", "token", "agents", "submit", "status", "wait", "cancel"):
        assert command in out
    for command in ("tasks", "events", "top", "apikey", "login", "audit"):
        assert command in out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600),
        ("3600s", 3600),
        ("90m", 5400),
        ("12h", 43200),
        ("30d", 2592000),
        ("1.5h", 5400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "5y", "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)

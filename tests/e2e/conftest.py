"""A real orchestration plane (``rexec serve``) and real agents (``rexec-agent``) as processes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from rexec.client import RexecClient
from rexec.schemas.settings import Settings
from tests.conftest import BOOTSTRAP_KEY
from tests.otlp import OtlpReceiver
from tests.support import Process, free_port, http_ready, python_entry, wait_until


def settings_env(settings: Settings) -> dict[str, str]:
    env = {
        "REXEC_DATABASE_URL": settings.database_url,
        "REXEC_AMQP_URL": settings.amqp_url,
        "REXEC_REDIS_URL": settings.redis_url,
        "REXEC_REDIS_PREFIX": settings.redis_prefix,
        "REXEC_API_URL": settings.api_url,
        "REXEC_API_PORT": str(settings.api_port),
        "REXEC_HEARTBEAT_TTL": str(settings.heartbeat_ttl),
        "REXEC_WATCHDOG_INTERVAL": str(settings.watchdog_interval),
        "REXEC_API_KEY": settings.api_key or BOOTSTRAP_KEY,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    if settings.signing_key:
        env["REXEC_SIGNING_KEY"] = settings.signing_key
    if settings.management_url != Settings().management_url:  # a private broker's
        env["REXEC_MANAGEMENT_URL"] = settings.management_url
    for name in ("api_tls_cert", "api_tls_key", "ca_file"):  # HTTPS (tests/faults/test_tls.py)
        if value := getattr(settings, name):
            env[f"REXEC_{name.upper()}"] = value
    return env


class Plane:
    """One dispatcher process plus the agents a test starts; all stopped at teardown."""

    def __init__(
        self, settings: Settings, logs: Path, env: Mapping[str, str] | None = None
    ) -> None:
        port = free_port()
        self.scheme = "https" if settings.api_tls_cert else "http"
        self.settings = Settings(
            **{
                **_fields(settings),
                "api_port": port,
                "api_url": f"{self.scheme}://127.0.0.1:{port}",
            }
        )
        self.logs = logs
        self.task_logs = logs / "task-logs"
        """Where this plane's agents keep task logs (unless a test gives one its own)."""
        self.env = {
            **settings_env(self.settings),
            "REXEC_LOG_DIR": str(self.task_logs),
            **(env or {}),
        }
        self.processes: list[Process] = []
        self.dispatcher = self.start_dispatcher()
        self.client = RexecClient(
            self.settings.api_url,
            api_key=self.settings.api_key or BOOTSTRAP_KEY,
            ca_file=self.settings.ca_file,
        )

    def start_dispatcher(self, api_port: int | None = None) -> Process:
        """A ``rexec serve``; another replica when ``api_port`` differs from the first's."""
        port = api_port or self.settings.api_port
        env = {"REXEC_API_PORT": str(port)}
        process = self._start(["rexec", "serve"], "dispatcher", env)
        wait_until(
            lambda: (
                http_ready(f"{self.scheme}://127.0.0.1:{port}/healthz", self.settings.ca_file)
                or process.popen.poll() is not None
            ),
            30,
            "the dispatcher's API",
        )
        assert process.popen.poll() is None, f"rexec serve exited:\n{process.output()}"
        return process

    def start_agent(
        self,
        pool: str,
        *args: str,
        token: str | None = None,
        name: str = "agent",
        env: dict[str, str] | None = None,
    ) -> Process:
        if token is None:
            token = self.client.create_token(pool).secret
        return self._start(
            ["rexec-agent", "--pool", pool, *args],
            name,
            {"REXEC_AGENT_TOKEN": token, **(env or {})},
        )

    def _start(self, argv: list[str], name: str, env: dict[str, str]) -> Process:
        module = {"rexec": "rexec.client.cli", "rexec-agent": "rexec.worker.cli"}[argv[0]]
        log = self.logs / f"{name}-{len(self.processes)}.log"
        process = Process([*python_entry(module), *argv[1:]], {**self.env, **env}, log)
        self.processes.append(process)
        return process

    def close(self) -> None:
        # The client first: an idle HTTPS keep-alive connection would hold up the server's
        # graceful shutdown (its TLS close waits for the client's close_notify).
        self.client.close()
        for process in reversed(self.processes):
            process.stop()

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-4000:]}" for p in self.processes)


def _fields(settings: Settings) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(settings)


@pytest.fixture
def plane(settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    plane = Plane(settings, tmp_path)
    yield plane
    plane.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver of this test's own."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def traced_plane(
    settings: Settings, receiver: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Plane]:
    """A plane whose processes export their spans to ``receiver``."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    plane = Plane(settings, tmp_path)
    yield plane
    plane.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the logs of every process the test started to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    plane = getattr(item, "funcargs", {}).get("plane")
    if report.when == "call" and report.failed and isinstance(plane, Plane):
        report.sections.append(("rexec processes", plane.dump_logs()))

"""Private RabbitMQ, Redis and PostgreSQL servers for tests that restart or reconfigure them.

Fault tests must not disturb the shared services other tests use, so they get servers of
their own on other ports, started once per test session and stopped at its end. Given a
certificate (``tests/faults/certs.py``), each listens with TLS only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import asyncpg
import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.certs import ServerCert
from tests.support import free_port, wait_until

GUEST = ("guest", "guest")


def _run(
    argv: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class PrivateRabbit:
    """A RabbitMQ node of a test session's own (see the guide, section 7)."""

    def __init__(
        self,
        name: str,
        consumer_timeout_ms: int = 60_000,
        tls: ServerCert | None = None,
        extra_config: str = "",
    ) -> None:
        self.name = name
        self.node = f"{name}@localhost"
        self.port = free_port()
        self.management_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.tls = tls
        (self.dir / "rabbitmq.conf").write_text(
            self._listeners() + f"management.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            f"consumer_timeout = {consumer_timeout_ms}\n"
            "loopback_users = none\n" + extra_config
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
            for path in self.dir.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
            "RABBITMQ_DIST_PORT": str(free_port()),
        }

    def _listeners(self) -> str:
        if self.tls is None:
            return f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        # TLS only. The files are copied into the node's directory, which the server (dropping
        # to the rabbitmq user when started as root) can read.
        files = self.dir / "tls"
        files.mkdir()
        for path in (self.tls.ca, self.tls.cert, self.tls.key):
            shutil.copy(path, files / path.name)
        return (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {files / self.tls.ca.name}\n"
            f"ssl_options.certfile = {files / self.tls.cert.name}\n"
            f"ssl_options.keyfile = {files / self.tls.key.name}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    @property
    def amqp_url(self) -> str:
        if self.tls is not None:
            return f"amqps://guest:guest@127.0.0.1:{self.port}/?cafile={self.tls.ca}"
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}"

    def start(self) -> None:
        result = _run(["rabbitmq-server", "-detached"], self.env)
        assert result.returncode == 0, f"rabbitmq-server did not start: {result.stderr}"
        waited = _run(
            [
                "rabbitmqctl",
                "-n",
                self.node,
                "wait",
                self.env["RABBITMQ_PID_FILE"],
                "--timeout",
                "60",
            ],
            self.env,
            90,
        )
        assert waited.returncode == 0, (
            f"{self.node} did not come up: {waited.stdout}{waited.stderr}"
        )

    def connections(self) -> dict[str, bool]:
        """Connection name -> whether it is TLS, straight from the node (the management
        API's list lags by a statistics interval)."""
        listed = _run(
            [
                *("rabbitmqctl", "-n", self.node, "-q", "list_connections"),
                *("ssl", "client_properties", "--formatter", "json"),
            ],
            self.env,
        )
        assert listed.returncode == 0, f"list_connections failed: {listed.stderr}"
        named: dict[str, bool] = {}
        for connection in json.loads(listed.stdout):
            props = {key: value for key, _, value in connection["client_properties"]}
            named[str(props.get("connection_name", ""))] = bool(connection["ssl"])
        return named

    def stop(self) -> None:
        if not Path(self.env["RABBITMQ_PID_FILE"]).exists():
            return  # not running: `rabbitmqctl stop <pid file>` would wait for the file forever
        _run(["rabbitmqctl", "-n", self.node, "stop", self.env["RABBITMQ_PID_FILE"]], self.env, 60)

    def restart(self) -> None:
        self.stop()
        self.start()

    def launch(self) -> None:
        """Start the server without waiting for it; nodes of a cluster boot in parallel."""
        result = _run(["rabbitmq-server", "-detached"], self.env)
        assert result.returncode == 0, f"rabbitmq-server did not start: {result.stderr}"

    def cluster_running(self) -> set[str]:
        """The nodes this node's management API reports running (empty while it boots)."""
        try:
            response = httpx.get(f"{self.management_api}/api/nodes", auth=GUEST, timeout=5)
            response.raise_for_status()
        except httpx.HTTPError:
            return set()
        return {n["name"] for n in response.json() if n.get("running")}

    @property
    def management_api(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def terminate(self) -> int | None:
        """SIGTERM the node's VM (Erlang stops gracefully on it), without waiting; its pid,
        or None when it is not running."""
        pid_file = Path(self.env["RABBITMQ_PID_FILE"])
        if not pid_file.exists():
            return None
        pid = int(pid_file.read_text().strip())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        return pid

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, no goodbye to the cluster or the clients."""
        pid_file = Path(self.env["RABBITMQ_PID_FILE"])
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10, f"{self.node}'s VM to die")
        pid_file.unlink()  # not running: stop() and terminate() leave it alone

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateCluster:
    """Three private nodes clustered together, for tests that lose a node.

    Nodes started by one user share that user's Erlang cookie (as root, the server and
    ``rabbitmqctl`` both run as the ``rabbitmq`` user with its HOME), so they may cluster.
    They boot in parallel and the others join the first as they boot (about 11 s on an idle
    2-core machine; ``stop_app`` / ``join_cluster`` / ``start_app`` took about 30 s, most of
    it starting a CLI VM per call). ``cleanup`` stops them with SIGTERM, in parallel.
    A node a test kills stays down for the rest of the session.
    """

    def __init__(self, name: str, size: int = 3) -> None:
        first = PrivateRabbit(f"{name}-n1")
        # The others find the first at boot (classic peer discovery) and join it, retrying
        # while it boots: no stop_app / join_cluster / start_app round of CLI calls.
        join_first = (
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"cluster_formation.classic_config.nodes.1 = {first.node}\n"
            "cluster_formation.discovery_retry_limit = 240\n"
            "cluster_formation.discovery_retry_interval = 500\n"
        )
        self.nodes = [first] + [
            PrivateRabbit(f"{name}-n{i + 1}", extra_config=join_first) for i in range(1, size)
        ]
        self.names = {node.node for node in self.nodes}

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated, as ``REXEC_AMQP_URL`` takes them."""
        return ",".join(node.amqp_url for node in self.nodes)

    def by_name(self, node: str) -> PrivateRabbit:
        return next(n for n in self.nodes if n.node == node)

    def start(self) -> None:
        for node in self.nodes:
            node.launch()
        wait_until(
            lambda: all(node.cluster_running() == self.names for node in self.nodes),
            120,
            f"the cluster {sorted(self.names)} to form",
        )

    def cleanup(self) -> None:
        """Stop the nodes still running, in parallel, and remove their directories (their
        logs are copied first to ``REXEC_TEST_KEEP_BROKER_LOGS`` when it is set)."""
        pids = [pid for node in self.nodes if (pid := node.terminate()) is not None]
        try:
            wait_until(lambda: not any(map(_alive, pids)), 60, "the cluster's nodes to stop")
        finally:
            for pid in filter(_alive, pids):
                os.kill(pid, signal.SIGKILL)
            for node in self.nodes:
                Path(node.env["RABBITMQ_PID_FILE"]).unlink(missing_ok=True)
        keep = os.environ.get("REXEC_TEST_KEEP_BROKER_LOGS")
        for node in self.nodes:
            if keep:
                shutil.copytree(node.dir / "log", Path(keep) / node.name, dirs_exist_ok=True)
            node.cleanup()


class PrivateRedis:
    """A Redis of a test's own that keeps nothing on disk, so a restart loses every key."""

    def __init__(self, tls: ServerCert | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rexec-redis-"))
        self.tls = tls

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _listener(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls.cert),
            "--tls-key-file",
            str(self.tls.key),
            "--tls-ca-cert-file",
            str(self.tls.ca),
            "--tls-auth-clients",
            "no",
        ]

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                *self._listener(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--dir",
                str(self.dir),
                "--pidfile",
                str(self.dir / "redis.pid"),
            ],
            check=True,
            capture_output=True,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, "the private redis")
        client.close()

    def stop(self) -> None:
        client = redis.Redis.from_url(self.url)
        with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
            client.shutdown(nosave=True)
        client.close()
        wait_until(
            lambda: not _pings(redis.Redis.from_url(self.url)), 10, "the private redis to stop"
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        return int((self.dir / "redis.pid").read_text())

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and commands wait unanswered, as in a long stall."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.thaw()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL server of a test session's own (trust auth, no fsync), to restart.

    As root, ``initdb`` and ``postgres`` refuse to run: they run as the ``postgres`` user, who
    owns the directory. Its settings are in its ``postgresql.conf``, so a restart keeps them.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rexec-postgres-"))
        self.data = self.dir / "data"
        self.bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """What ``asyncpg.connect`` takes, for the ``postgres`` maintenance database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return _run(argv, {}, timeout)

    def _init(self) -> None:
        made = self._ctl("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N")
        assert made.returncode == 0, f"initdb failed: {made.stdout}{made.stderr}"
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
            )

    def start(self) -> None:
        if not self.data.exists():
            self._init()
        self._pg_ctl("start", "-l", str(self.dir / "postgres.log"))

    def stop(self) -> None:
        """A fast shutdown: every open connection is terminated, as in a failover."""
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: connections terminated, the server back at once."""
        self._pg_ctl("restart", "-m", "fast", "-l", str(self.dir / "postgres.log"))

    def create_database(self) -> str:
        """A new database with rexec's schema migrated; returns its URL."""
        name = f"rexec_{uuid.uuid4().hex[:10]}"
        anyio.run(self._admin, f'CREATE DATABASE "{name}"')
        url = self.url(name)
        from rexec.dispatcher.db.migrate import upgrade

        upgrade(url)
        return url

    def refuse_connections(self, database: str) -> None:
        """Make ``database`` refuse connections, and cut off those it has (as a failover
        does): statements fail with SQLSTATE 55000 or 08003, not with a refused connect."""
        anyio.run(self._admin, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
        anyio.run(
            self._admin,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'",
        )

    def accept_connections(self, database: str) -> None:
        anyio.run(self._admin, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')

    async def _admin(self, statement: str) -> None:
        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def _pg_ctl(self, action: str, *args: str) -> None:
        done = self._ctl("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args, action)
        assert done.returncode == 0, f"pg_ctl {action} failed: {done.stdout}{done.stderr}"

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateSentinel:
    """A master, one replica and three Sentinels (quorum 2) of a test session's own.

    Sentinels mark a silent master down after about a second, so killing the master makes
    them promote the replica within a few seconds. ``heal`` brings a killed node back as a
    replica of whoever is master now, so the group can fail over again.
    """

    SERVICE = "mymaster"

    def __init__(self, down_after_ms: int = 1000) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rexec-sentinel-"))
        self.node_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return (
            f"redis+sentinel://{hosts}/{self.SERVICE}/0?socket_timeout=1&socket_connect_timeout=1"
        )

    def _pidfile(self, port: int) -> Path:
        return self.dir / f"redis-{port}.pid"

    def _start_node(self, port: int, replica_of: int | None) -> None:
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(self.dir),
            "--dbfilename",
            f"dump-{port}.rdb",
            "--pidfile",
            str(self._pidfile(port)),
            "--logfile",
            str(self.dir / f"redis-{port}.log"),
        ]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        subprocess.run(argv, check=True, capture_output=True)
        client = _client(port)
        wait_until(lambda: _pings(client), 10, f"redis node {port}")
        client.close()

    def _start_sentinel(self, port: int, master_port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            "daemonize yes\n"
            f"pidfile {self.dir / f'sentinel-{port}.pid'}\n"
            f"logfile {self.dir / f'sentinel-{port}.log'}\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n"
        )
        subprocess.run(["redis-server", str(conf), "--sentinel"], check=True, capture_output=True)

    def start(self) -> None:
        master, replica = self.node_ports
        self._start_node(master, None)
        self._start_node(replica, master)
        for port in self.sentinel_ports:
            self._start_sentinel(port, master)
        wait_until(self.settled, 30, "the sentinels to see the master, its replica and each other")

    def sentinel_state(self) -> dict[str, object] | None:
        client = _client(self.sentinel_ports[0])
        try:
            return dict(client.sentinel_master(self.SERVICE))
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            return None
        finally:
            client.close()

    def master_port(self) -> int | None:
        """The master every Sentinel agrees on, once it is up (None during a failover)."""
        ports = set()
        for port in self.sentinel_ports:
            client = _client(port)
            try:
                _host, master = client.sentinel_get_master_addr_by_name(self.SERVICE)
                state = client.sentinel_master(self.SERVICE)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError, TypeError):
                return None
            finally:
                client.close()
            if state.get("is_sdown") or state.get("is_odown") or not state.get("is_master"):
                return None
            ports.add(int(master))
        return ports.pop() if len(ports) == 1 else None

    def settled(self) -> bool:
        """One agreed master with a live, synced replica, and every Sentinel knows the others."""
        master = self.master_port()
        if master is None:
            return False
        for port in self.sentinel_ports:
            client = _client(port)
            try:
                state = client.sentinel_master(self.SERVICE)
                replicas = client.sentinel_slaves(self.SERVICE)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                return False
            finally:
                client.close()
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                return False
            live = [r for r in replicas if not r.get("is_sdown") and not r.get("is_odown")]
            if not any(r.get("master-link-status") == "ok" for r in live):
                return False
        return True

    def kill_master(self) -> int:
        """kill -9 the current master; returns its port."""
        master = self.master_port()
        assert master is not None, "no agreed master to kill"
        pid = int(self._pidfile(master).read_text())
        os.kill(pid, signal.SIGKILL)
        client = _client(master)
        wait_until(lambda: not _pings(client), 10, "the killed master to stop answering")
        client.close()
        self._pidfile(master).unlink(missing_ok=True)
        return master

    def heal(self) -> None:
        """Start every dead node again as a replica of the current master."""
        master = wait_until(self.master_port, 30, "an agreed master")
        for port in self.node_ports:
            client = _client(port)
            alive = _pings(client)
            client.close()
            if not alive:
                self._start_node(port, master)
        wait_until(self.settled, 30, "the sentinel group to settle")

    def cleanup(self) -> None:
        for pidfile in self.dir.glob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        for port in self.node_ports + self.sentinel_ports:
            client = _client(port)
            wait_until(lambda c=client: not _pings(c), 10, f"redis {port} to stop")  # type: ignore[misc]
            client.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _client(port: int) -> redis.Redis:
    """A client that fails at once: no retries, so polling a dead server is quick."""
    return redis.Redis(
        port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


if __name__ == "__main__":  # a quick manual check: python -m tests.faults.servers
    import sys

    if sys.argv[1:] == ["cluster"]:
        began = time.monotonic()
        cluster = PrivateCluster("rexec-selfcheck")
        try:
            cluster.start()
            print(f"cluster up in {time.monotonic() - began:.1f}s: {cluster.amqp_url}")
            began = time.monotonic()
            cluster.nodes[0].kill()
            print(f"n1 killed in {time.monotonic() - began:.1f}s")
        finally:
            began = time.monotonic()
            cluster.cleanup()
            print(f"cluster stopped in {time.monotonic() - began:.1f}s")
        sys.exit(0)
    began = time.monotonic()
    rabbit = PrivateRabbit("rexec-selfcheck")
    rabbit.start()
    print(f"rabbit up in {time.monotonic() - began:.1f}s on {rabbit.port}")
    began = time.monotonic()
    rabbit.restart()
    print(f"rabbit restarted in {time.monotonic() - began:.1f}s")
    rabbit.cleanup()
    r = PrivateRedis()
    r.start()
    r.restart()
    r.cleanup()
    print("redis ok")
    began = time.monotonic()
    group = PrivateSentinel()
    group.start()
    print(f"sentinel group up in {time.monotonic() - began:.1f}s, master {group.master_port()}")
    began = time.monotonic()
    killed = group.kill_master()
    wait_until(lambda: group.master_port() not in (None, killed), 30, "a failover")
    print(f"failover in {time.monotonic() - began:.1f}s, master now {group.master_port()}")
    group.heal()
    print(f"healed in {time.monotonic() - began:.1f}s")
    group.cleanup()

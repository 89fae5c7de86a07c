"""The Grafana dashboard (deploy/grafana/rexec.json) and the Prometheus config that feeds it.

The structure is checked without services. Then a real ``rexec serve`` and ``rexec-agent`` run
tasks, and every metric the dashboard's PromQL names must be exported by one of the endpoints
deploy/prometheus/prometheus.yml scrapes: the dispatcher's /metrics, an agent's health port and
the local RabbitMQ's Prometheus plugin at the paths (and ``params``) of its jobs there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rexec.schemas.api import SubmitTask, TaskState
from tests.conftest import ADMIN_HEADERS
from tests.e2e.conftest import Plane
from tests.support import free_port, http_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "rexec.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
COMPOSE = ROOT / "compose.yaml"
RABBITMQ_PROMETHEUS = os.environ.get("REXEC_TEST_RABBITMQ_PROMETHEUS", "http://127.0.0.1:15692")
DATASOURCE = "${datasource}"
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$pool": ".*"}
# Suffixes under which a family's samples appear, by the family's type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": (),
}

Panel = dict[str, Any]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(model: dict[str, Any]) -> Iterator[Panel]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {p['id']} {p['title']!r} target {t.get('refId')}", t["expr"])
        for p in panels(model)
        for t in p.get("targets", [])
    ]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
            assert match, f"variable {variable['name']}: expected label_values(...), got {text!r}"
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


@dataclass
class Selector:
    metric: str
    labels: set[str]
    """Label names the query matches on or groups by: each must exist on the metric."""


@dataclass
class Walk:
    selectors: list[Selector] = field(default_factory=list)

    def visit(self, node: Any, grouping: frozenset[str] = frozenset()) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers} | set(grouping)
            assert node.name, f"a selector without a metric name: {node}"
            self.selectors.append(Selector(node.name, labels))
            return
        if isinstance(node, promql_parser.MatrixSelector):
            self.visit(node.vector_selector, grouping)
            return
        if isinstance(node, promql_parser.AggregateExpr):
            modifier = node.modifier
            by_labels = modifier is not None and modifier.type == promql_parser.AggModifierType.By
            by = set(modifier.labels) if by_labels else set()
            by.discard("le")  # histogram_quantile's bucket label, there by construction
            grouping = frozenset(by)
        for name in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, name, None)
            if child is not None:
                self.visit(child, grouping)
        for child in getattr(node, "args", None) or []:
            self.visit(child, grouping)


def selectors(expr: str) -> list[Selector]:
    walk = Walk()
    walk.visit(promql_parser.parse(substitute(expr)))
    return walk.selectors


# --- structure, no services ---------------------------------------------------------------------


def test_dashboard_structure() -> None:
    model = dashboard()
    assert model["schemaVersion"] >= 39, "a dashboard model of a current Grafana (11 or newer)"
    assert model["uid"] and model["title"]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pool"]["type"] == "query" and variables["pool"]["includeAll"]
    assert variables["pool"]["datasource"]["uid"] == DATASOURCE

    every = list(panels(model))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    graphs = [p for p in every if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        where = f"panel {p['id']} {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, where
        assert p.get("description"), f"{where}: say what it tells an operator"
        assert p["targets"], f"{where} has no target"
        for target in p["targets"]:
            assert target.get("expr", "").strip(), f"{where}: target {target.get('refId')} no expr"
            assert target["datasource"]["uid"] == DATASOURCE, where
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where

    # Panels do not overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for p in every:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]


def test_every_query_parses_and_names_its_metrics() -> None:
    for where, expr in queries(dashboard()):
        try:
            found = selectors(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: PromQL does not parse ({exc}): {expr}")
        assert found, f"{where}: no metric in {expr}"


def test_provisioning_and_compose_point_at_the_dashboard() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [source] = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "rexec.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    mounts = services["grafana"]["volumes"]
    assert f"./deploy/grafana/rexec.json:{path}/rexec.json:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert any(
        v.startswith("./deploy/prometheus/prometheus.yml:")
        for v in services["prometheus"]["volumes"]
    )
    # Every scrape target is a compose service, at the port it serves metrics on.
    config = yaml.safe_load(PROMETHEUS.read_text())
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services, f"job {job['job_name']}: no compose service {host}"
                if host.startswith("agent-"):
                    assert services[host]["environment"]["REXEC_HEALTH_PORT"] == port


def test_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        # Not a dependency the project installs: tests/deploy checks the config's shape above.
        pytest.skip(
            "no promtool to check deploy/prometheus/prometheus.yml: apt-get install -y prometheus"
        )
    run = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --- against live endpoints ---------------------------------------------------------------------


@dataclass
class Scrape:
    """What one endpoint exports: metric names (as PromQL sees them) and their label names."""

    source: str
    declared: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=dict)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    @classmethod
    def parse(cls, source: str, text: str) -> Scrape:
        scrape = cls(source)
        for family in text_string_to_metric_families(text):
            scrape.declared.add(family.name)
            scrape.declared.update(family.name + s for s in SUFFIXES.get(family.type, ()))
            for sample in family.samples:
                scrape.declared.add(sample.name)
                scrape.labels.setdefault(sample.name, set()).update(sample.labels)
                scrape.samples.append((sample.name, dict(sample.labels), sample.value))
        return scrape

    def value(self, name: str, **labels: str) -> float | None:
        for sample, have, value in self.samples:
            if sample == name and all(have.get(k) == v for k, v in labels.items()):
                return value
        return None


def rabbitmq_paths() -> list[tuple[str, dict[str, list[str]]]]:
    """The (path, params) of every RabbitMQ job in deploy/prometheus/prometheus.yml."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    paths = [
        (job.get("metrics_path", "/metrics"), job.get("params", {}))
        for job in config["scrape_configs"]
        if job["job_name"].startswith("rabbitmq")
    ]
    assert paths, "prometheus.yml has no rabbitmq job"
    return paths


def scrape(source: str, url: str, params: dict[str, list[str]] | None = None) -> Scrape:
    response = httpx.get(url, params=params, headers=ADMIN_HEADERS, timeout=30)
    assert response.status_code == 200, f"{source}: {url} answered HTTP {response.status_code}"
    return Scrape.parse(source, response.text)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """One database is enough here: the metrics do not depend on it."""
    return sqlite_url


@pytest.fixture
def plane(settings: Any, tmp_path: Path) -> Iterator[Plane]:
    plane = Plane(settings, tmp_path)
    yield plane
    plane.close()


def test_every_metric_on_the_dashboard_is_exported(
    plane: Plane, pool_name: str, vhost: str
) -> None:
    client = plane.client
    client.create_pool(pool_name)
    health = free_port()
    plane.env["REXEC_HEALTH_PORT"] = str(health)
    plane.start_agent(pool_name, "--concurrency", "2", "--allow", "tests.tasks:*")
    wait_until(lambda: http_ready(f"http://127.0.0.1:{health}/readyz"), 30, "the agent's /readyz")
    ids = client.submit_many(
        [SubmitTask(pool=pool_name, target="tests.tasks:add", args=[i, 1]) for i in range(5)]
        + [SubmitTask(pool=pool_name, target="tests.tasks:fail", max_attempts=1)]
    )
    done = client.wait(ids, timeout=60)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 5 + [TaskState.FAILED]

    dispatcher = scrape("dispatcher", f"{plane.settings.api_url}/metrics")
    agent = scrape("agent", f"http://127.0.0.1:{health}/metrics")
    endpoints = [dispatcher, agent]
    rabbitmq_missing = None
    if http_ready(f"{RABBITMQ_PROMETHEUS}/metrics"):
        for path, params in rabbitmq_paths():
            endpoints.append(scrape(f"rabbitmq {path}", RABBITMQ_PROMETHEUS + path, params))
    else:
        rabbitmq_missing = (
            f"RabbitMQ's Prometheus plugin does not answer at {RABBITMQ_PROMETHEUS}: "
            "`make services` enables it (rabbitmq-plugins enable rabbitmq_prometheus)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(rabbitmq_missing)

    # The workload left samples where the dashboard's main panels look.
    assert dispatcher.value("rexec_tasks", pool=pool_name, state="succeeded") == 5
    assert dispatcher.value("rexec_run_seconds_count", pool=pool_name, state="failed") == 1
    assert dispatcher.value("rexec_submit_to_start_seconds_count", pool=pool_name) == 6
    assert dispatcher.value("rexec_agents_live", pool=pool_name) == 1
    assert dispatcher.value("rexec_queue_depth", pool=pool_name) == 0
    assert agent.value("rexec_agent_tasks_total", pool=pool_name, outcome="succeeded") == 5
    assert agent.value("rexec_agent_slots", pool=pool_name) == 2

    missing: list[str] = []
    unlabelled: list[str] = []
    for where, expr in queries(dashboard()):
        for selector in selectors(expr):
            owners = [e for e in endpoints if selector.metric in e.declared]
            if not owners:
                if not (rabbitmq_missing and selector.metric.startswith("rabbitmq_")):
                    missing.append(f"{selector.metric} ({where})")
                continue
            have = set().union(*(e.labels.get(selector.metric, set()) for e in owners))
            sampled = any(selector.metric in e.labels for e in owners)
            lacking = selector.labels - have - {"__name__"}
            if sampled and lacking:
                unlabelled.append(f"{selector.metric} has no label {sorted(lacking)} ({where})")
    assert not missing, "metrics no endpoint exports:\n" + "\n".join(missing)
    assert not unlabelled, "\n".join(unlabelled)

    if rabbitmq_missing is None:
        # The join: RabbitMQ's per-queue series for this pool carry the queue name the
        # dashboard matches with queue=~"rexec.pool.$pool".
        # The broker emits queue statistics every few seconds: a new queue shows up after one.
        [(path, params)] = [(p, q) for p, q in rabbitmq_paths() if "detailed" in p]
        queue = f"rexec.pool.{pool_name}"

        def pool_queue() -> tuple[float | None, float | None] | None:
            queues = scrape("rabbitmq", RABBITMQ_PROMETHEUS + path, params)
            ready = queues.value("rabbitmq_detailed_queue_messages_ready", vhost=vhost, queue=queue)
            consumers = queues.value("rabbitmq_detailed_queue_consumers", vhost=vhost, queue=queue)
            return (ready, consumers) if consumers is not None else None

        seen = wait_until(pool_queue, 30, f"RabbitMQ's per-queue metrics of {queue}")
        assert seen == (0, 1), f"{queue}: (ready, consumers) = {seen}"
    else:
        pytest.skip(f"rexec metrics checked; RabbitMQ's not: {rabbitmq_missing}")

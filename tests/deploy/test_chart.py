"""The Helm chart and its example app chart, rendered by Helm's own engine (helm-python-sdk)
and checked against the Kubernetes schemas: probes, security, env, volumes, ports, modes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import typing
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import helm_python
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import config
from sidecar.v1.inference_pb2 import EmbedRequest
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "transformers-sidecar"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion), and the newest schemas here.
KUBE_MIN, KUBE_LATEST = "1.30.0", "1.37.0"
# Image volumes (a model source) need the newer API.
KUBE_IMAGE_VOLUMES = "1.31.0"
PROBE_SERVICES = {"startupProbe": "", "readinessProbe": "sidecar.v1.Inference"}

Manifests = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example app chart with its dependency built from the committed Chart.lock."""
    helm = tmp_path_factory.mktemp("charts") / "helm"
    shutil.copytree(ROOT / "helm", helm, ignore=shutil.ignore_patterns("charts"))
    built = helm / "examples" / "ticket-service"
    helm_python.dependency_build(built)
    return built


@pytest.fixture(scope="module")
def example(example_dir: Path) -> Iterator[helm_python.Chart]:
    loaded = helm_python.Chart.load(example_dir)
    yield loaded
    loaded.close()


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> Manifests:
    """Kind -> objects rendered, each one valid against the Kubernetes schemas."""
    rendered = chart.render(values or {}, name="support", namespace="helpdesk")
    found: Manifests = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                found.setdefault(doc["kind"], []).append(doc)
    uses_image_volumes = any(
        "image" in volume
        for deployment in found.get("Deployment", [])
        for volume in deployment["spec"]["template"]["spec"].get("volumes") or []
    )
    oldest = KUBE_IMAGE_VOLUMES if uses_image_volumes else KUBE_MIN
    for doc in (doc for docs in found.values() for doc in docs):
        # The Prometheus Operator's kinds are CRDs: the Kubernetes schemas do not have them.
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            for version in (oldest, KUBE_LATEST):
                kubernetes_validate.validate(doc, version, strict=True)
    return found


def notes(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> str:
    rendered = chart.render(values or {}, name="support", namespace="helpdesk")
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def pod(manifests: Manifests) -> dict[str, Any]:
    (deployment,) = manifests["Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def server(spec: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's container, wherever the pod has it."""
    containers = spec["containers"] + (spec.get("initContainers") or [])
    (found,) = [c for c in containers if c["name"] == "transformers-sidecar"]
    return found


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in container.get("env") or []}


def rejected(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as refused:
        chart.render(values, name="support", namespace="helpdesk")
    return str(refused.value)


def assert_hardened(container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"


def assert_probes(container: dict[str, Any]) -> None:
    """Native gRPC probes on the health-only listener, each on the service that means it."""
    (health_port,) = [
        p["containerPort"] for p in container["ports"] if p["name"] == "sidecar-health"
    ]
    expected = {**PROBE_SERVICES, "livenessProbe": "liveness"}
    for probe, service in expected.items():
        assert container[probe]["grpc"] == {"port": health_port, "service": service}, probe
    assert env(container)["SIDECAR_HEALTH_ADDRESS"] == f"0.0.0.0:{health_port}"


def test_standalone_defaults(chart: helm_python.Chart) -> None:
    manifests = render(chart)
    assert set(manifests) == {"Deployment", "Service", "PodDisruptionBudget", "Pod"}
    spec = pod(manifests)
    container = server(spec)
    assert (
        container["image"] == f"ghcr.io/transformers-sidecar/transformers-sidecar:{app_version()}"
    )
    assert_probes(container)
    assert_hardened(container)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    variables = env(container)
    assert variables["SIDECAR_ADDRESS"] == "0.0.0.0:50051"
    assert variables["SIDECAR_METRICS_ADDRESS"] == "0.0.0.0:9464"
    assert variables["SIDECAR_MODELS"] == "all-minilm-l6-v2=/models/all-minilm-l6-v2"
    assert variables["SIDECAR_INTRA_OP_THREADS"] == "1"  # from the CPU request
    assert variables["SIDECAR_MAX_CONNECTION_AGE_S"] == "300"
    assert variables["HF_HUB_OFFLINE"] == "1"
    # preStop 5 s (endpoints catch up) + grace_period_s 10 + 5 s to exit.
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert spec["terminationGracePeriodSeconds"] == 20
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    annotations = manifests["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"
    (service,) = manifests["Service"]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "sidecar-grpc",
        "health": "sidecar-health",
        "metrics": "sidecar-metrics",
    }
    (test_pod,) = manifests["Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = test_pod["spec"]["containers"][0]["command"]
    assert command[:4] == ["sidecar", "client", "--address", "support-transformers-sidecar:50052"]
    assert command[-3:] == ["health", "--service", "sidecar.v1.Inference"]
    assert_hardened(test_pod["spec"]["containers"][0])


def test_standalone_with_every_option(chart: helm_python.Chart) -> None:
    values = {
        "autoscaling": {"enabled": True, "maxReplicas": 6},
        "service": {"headless": True},
        "metrics": {"monitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "dashboard": {"enabled": True},
        "otel": {
            "endpoint": "http://$(HOST_IP):4317",
            "sampler": "parentbased_traceidratio",
            "samplerArg": "0.1",
            "resourceAttributes": {"team": "support"},
            "extraEnv": {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 256},
        },
        "config": {"max_message_bytes": 16777216, "max_batch_delay_ms": 2.5, "log_inputs": False},
        "resources": {"requests": {"cpu": "2500m", "memory": "2Gi"}},
    }
    manifests = render(chart, values)
    assert "replicas" not in manifests["Deployment"][0]["spec"]  # the HPA owns it
    (hpa,) = manifests["HorizontalPodAutoscaler"]
    assert hpa["spec"]["maxReplicas"] == 6
    assert manifests["Service"][0]["spec"]["clusterIP"] == "None"
    # Scraped by the ServiceMonitor only, not by annotations too.
    assert "annotations" not in manifests["Deployment"][0]["spec"]["template"]["metadata"]
    (monitor,) = manifests["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (dashboard,) = manifests["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "transformers-sidecar.json").read_text())
    assert json.loads(dashboard["data"]["transformers-sidecar.json"]) == shipped
    container = server(pod(manifests))
    variables = env(container)
    assert variables["SIDECAR_MAX_MESSAGE_BYTES"] == "16777216"  # not 1.6777216e+07
    assert variables["SIDECAR_MAX_BATCH_DELAY_MS"] == "2.5"
    assert variables["SIDECAR_LOG_INPUTS"] == "false"
    assert variables["SIDECAR_INTRA_OP_THREADS"] == "3"  # 2500m, rounded up
    assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://$(HOST_IP):4317"
    assert variables["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert variables["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] == "256"
    attributes = variables["OTEL_RESOURCE_ATTRIBUTES"].split(",")
    assert "k8s.pod.name=$(POD_NAME)" in attributes
    assert "team=support" in attributes
    # $(VAR) expands only from variables defined earlier in the list.
    names = [e["name"] for e in container["env"]]
    for referenced in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME", "HOST_IP"):
        assert names.index(referenced) < names.index("OTEL_RESOURCE_ATTRIBUTES")
        assert names.index(referenced) < names.index("OTEL_EXPORTER_OTLP_ENDPOINT")


def test_http_api_off_by_default_and_on_by_a_value(
    chart: helm_python.Chart, example: helm_python.Chart
) -> None:
    container = server(pod(render(chart)))
    assert env(container)["SIDECAR_HTTP_ADDRESS"] == ""  # over the server's loopback default
    manifests = render(chart, {"http": {"enabled": True, "port": 8081}})
    container = server(pod(manifests))
    assert env(container)["SIDECAR_HTTP_ADDRESS"] == "0.0.0.0:8081"
    assert {"name": "sidecar-http", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    (http,) = [p for p in manifests["Service"][0]["spec"]["ports"] if p["name"] == "http"]
    assert (http["port"], http["targetPort"]) == (8081, "sidecar-http")
    # Beside an app: on the pod's loopback, where the app container reaches it.
    beside = server(pod(render(example, {"sidecar": {"http": {"enabled": True}}})))
    assert env(beside)["SIDECAR_HTTP_ADDRESS"] == "127.0.0.1:8080"
    assert "sidecar-http" not in {p["name"] for p in beside["ports"]}
    assert "must differ" in rejected(chart, {"http": {"enabled": True, "port": 9464}})


def test_metrics_off(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"metrics": {"enabled": False, "monitor": {"enabled": True}}})
    container = server(pod(manifests))
    # Empty turns the endpoint off, over the image's 0.0.0.0:9464.
    assert env(container)["SIDECAR_METRICS_ADDRESS"] == ""
    assert "sidecar-metrics" not in {p["name"] for p in container["ports"]}
    assert "annotations" not in manifests["Deployment"][0]["spec"]["template"]["metadata"]
    assert "metrics" not in {p["name"] for p in manifests["Service"][0]["spec"]["ports"]}
    assert "ServiceMonitor" not in manifests


def test_cuda(chart: helm_python.Chart) -> None:
    spec = pod(render(chart, {"device": "cuda", "gpu": {"nodeSelector": {"gpu": "h100"}}}))
    container = server(spec)
    assert container["image"].endswith(f":{app_version()}-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "2Gi"
    assert env(container)["SIDECAR_DEVICE"] == "cuda"
    assert spec["nodeSelector"] == {"gpu": "h100"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The user's own GPU count wins over gpu.count.
    two = {"device": "cuda", "resources": {"limits": {"nvidia.com/gpu": 2, "memory": "8Gi"}}}
    assert server(pod(render(chart, two)))["resources"]["limits"]["nvidia.com/gpu"] == 2
    cpu = pod(render(chart))
    assert "nodeSelector" not in cpu
    assert "tolerations" not in cpu
    assert "nvidia.com/gpu" not in server(cpu)["resources"]["limits"]


def test_model_sources(chart: helm_python.Chart) -> None:
    models = [
        {
            "name": "triage",
            "export": {
                "checkpoint": "acme/ticket-triage",
                "revision": "3f1c2b7",
                "task": "text-classification",
                "quantize": "int8",
                "tokenSecret": {"name": "hub-token"},
            },
        },
        {"name": "moderation", "pvc": {"claimName": "models", "subPath": "moderation-v2"}},
        {"name": "summaries", "image": {"reference": "registry.example/models/bart:1"}},
        {"name": "all-minilm-l6-v2", "path": "/models/all-minilm-l6-v2"},
    ]
    spec = pod(render(chart, {"models": models, "defaultModel": "triage"}))
    (export,) = spec["initContainers"]
    assert (
        export["image"]
        == f"ghcr.io/transformers-sidecar/transformers-sidecar:{app_version()}-export"
    )
    assert export["args"][:2] == ["acme/ticket-triage", "/srv/exports/triage"]
    assert {"--revision=3f1c2b7", "--task=text-classification", "--quantize=int8"} <= set(
        export["args"]
    )
    assert_hardened(export)
    token = next(e for e in export["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hub-token", "key": "token"}
    assert {m["mountPath"] for m in export["volumeMounts"]} == {"/srv/exports", "/tmp"}
    container = server(spec)
    assert env(container)["SIDECAR_MODELS"] == (
        "triage=/srv/exports/triage,moderation=/srv/models/moderation,"
        "summaries=/srv/models/summaries,all-minilm-l6-v2=/models/all-minilm-l6-v2"
    )
    assert env(container)["SIDECAR_DEFAULT_MODEL"] == "triage"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(mounts[path]["readOnly"] for path in mounts if path != "/tmp")
    assert mounts["/srv/models/moderation"]["subPath"] == "moderation-v2"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["sidecar-model-moderation"]["persistentVolumeClaim"]["readOnly"] is True
    assert volumes["sidecar-model-summaries"]["image"]["reference"] == (
        "registry.example/models/bart:1"
    )
    assert "emptyDir" in volumes[mounts["/srv/exports"]["name"]]


def test_unpinned_export_is_warned_about(chart: helm_python.Chart) -> None:
    models = [{"name": "triage", "export": {"checkpoint": "acme/ticket-triage"}}]
    assert "triage exports acme/ticket-triage without a revision" in notes(
        chart, {"models": models}
    )
    assert "WARNING" not in notes(chart)


TLS_DIR, CLIENT_CA_DIR, AUTH_DIR = (
    "/etc/transformers-sidecar/tls",
    "/etc/transformers-sidecar/client-ca",
    "/etc/transformers-sidecar/auth",
)


def secret_volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Secret volumes by name: the Secret and its items (key -> path)."""
    return {
        v["name"]: {
            "secret": v["secret"]["secretName"],
            "items": {i["key"]: i["path"] for i in v["secret"]["items"]},
            "mode": v["secret"]["defaultMode"],
        }
        for v in spec["volumes"]
        if "secret" in v
    }


def test_tls_and_token_come_from_secrets_mounted_read_only(chart: helm_python.Chart) -> None:
    values = {
        "tls": {"enabled": True, "secretName": "sidecar-tls", "clientAuth": True},
        "auth": {"tokenSecret": {"name": "sidecar-token"}},
    }
    manifests = render(chart, values)
    spec = pod(manifests)
    container = server(spec)
    variables = env(container)
    assert variables["SIDECAR_TLS_CERT_FILE"] == f"{TLS_DIR}/tls.crt"
    assert variables["SIDECAR_TLS_KEY_FILE"] == f"{TLS_DIR}/tls.key"
    assert variables["SIDECAR_TLS_CLIENT_CA_FILE"] == f"{TLS_DIR}/ca.crt"  # the Secret's own CA
    assert variables["SIDECAR_AUTH_TOKEN_FILE"] == f"{AUTH_DIR}/token"
    # The token is a file, never an environment variable a `describe` or a dump would show.
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in container["env"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["sidecar-tls"] == {"name": "sidecar-tls", "mountPath": TLS_DIR, "readOnly": True}
    assert mounts["sidecar-auth"] == {
        "name": "sidecar-auth",
        "mountPath": AUTH_DIR,
        "readOnly": True,
    }
    assert secret_volumes(spec) == {
        "sidecar-tls": {
            "secret": "sidecar-tls",
            "items": {"tls.crt": "tls.crt", "tls.key": "tls.key", "ca.crt": "ca.crt"},
            "mode": 0o444,
        },
        "sidecar-auth": {"secret": "sidecar-token", "items": {"token": "token"}, "mode": 0o444},
    }
    # Probes stay on the plain-text health port, which TLS and the token leave alone.
    assert_probes(container)
    assert variables["SIDECAR_ADDRESS"] == "0.0.0.0:50051"
    (test_pod,) = manifests["Pod"]
    assert "support-transformers-sidecar:50052" in test_pod["spec"]["containers"][0]["command"]
    text = notes(chart, values)
    assert "API port: mTLS, bearer token from Secret sidecar-token." in text
    assert "-plaintext" not in text
    assert "-servername support-transformers-sidecar.helpdesk.svc" in text


def test_tls_without_client_auth_and_a_separate_client_ca(chart: helm_python.Chart) -> None:
    plain_tls = server(pod(render(chart, {"tls": {"enabled": True, "secretName": "tls"}})))
    assert "SIDECAR_TLS_CLIENT_CA_FILE" not in env(plain_tls)
    assert "SIDECAR_AUTH_TOKEN_FILE" not in env(plain_tls)
    values = {
        "tls": {
            "enabled": True,
            "secretName": "sidecar-tls",
            "clientAuth": True,
            "clientCASecretName": "callers-ca",
        },
        "auth": {"tokenSecret": {"name": "sidecar-token", "key": "api.token"}},
    }
    spec = pod(render(chart, values))
    variables = env(server(spec))
    assert variables["SIDECAR_TLS_CLIENT_CA_FILE"] == f"{CLIENT_CA_DIR}/ca.crt"
    volumes = secret_volumes(spec)
    assert volumes["sidecar-tls"]["items"] == {"tls.crt": "tls.crt", "tls.key": "tls.key"}
    assert volumes["sidecar-client-ca"] == {
        "secret": "callers-ca",
        "items": {"ca.crt": "ca.crt"},
        "mode": 0o444,
    }
    assert volumes["sidecar-auth"]["items"] == {"api.token": "token"}
    mounts = {m["mountPath"]: m for m in server(spec)["volumeMounts"]}
    assert all(mounts[path]["readOnly"] for path in (TLS_DIR, CLIENT_CA_DIR, AUTH_DIR))
    # Nothing of it by default: plain text, no token, no Secret volumes.
    default = pod(render(chart))
    assert secret_volumes(default) == {}
    assert not any(
        name.startswith(("SIDECAR_TLS", "SIDECAR_AUTH")) for name in env(server(default))
    )
    assert "API port: plain text and no token" in notes(chart)


def test_example_app_chart_with_tls_and_a_token(example: helm_python.Chart) -> None:
    values = {
        "sidecar": {
            "tls": {"enabled": True, "secretName": "sidecar-tls"},
            "auth": {"tokenSecret": {"name": "sidecar-token"}},
        }
    }
    spec = pod(render(example, values))
    sidecar = server(spec)
    assert_probes(sidecar)
    assert env(sidecar)["SIDECAR_TLS_CERT_FILE"] == f"{TLS_DIR}/tls.crt"
    assert set(secret_volumes(spec)) == {"sidecar-tls", "sidecar-auth"}
    (app,) = spec["containers"]
    # Mounted into the sidecar only: the app's container gets neither key nor token.
    assert {m["name"] for m in app.get("volumeMounts") or []}.isdisjoint(secret_volumes(spec))


def test_example_app_chart_runs_a_native_sidecar(example: helm_python.Chart) -> None:
    manifests = render(example)
    # The dependency renders no Deployment of its own in sidecar mode.
    (deployment,) = manifests["Deployment"]
    assert deployment["metadata"]["name"] == "support-ticket-service"
    spec = pod(manifests)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "transformers-sidecar"
    assert sidecar["restartPolicy"] == "Always"  # ready before the app starts, stops after
    assert_probes(sidecar)
    assert_hardened(sidecar)
    assert "lifecycle" not in sidecar  # Kubernetes stops it after the app: no sleep needed
    assert env(sidecar)["SIDECAR_ADDRESS"] == "127.0.0.1:50051"  # the pod only
    (app,) = spec["containers"]
    assert env(app)["TRANSFORMERS_SIDECAR_ADDRESS"] == "127.0.0.1:50051"
    # The app's drain 10 s, then the sidecar's 10 s, then 5 s to exit.
    assert spec["terminationGracePeriodSeconds"] == 25
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    (test_pod,) = manifests["Pod"]
    assert "support-ticket-service:50052" in test_pod["spec"]["containers"][0]["command"]
    (service,) = manifests["Service"]
    # By number: Services resolve native sidecars' port names only from Kubernetes 1.32.
    health = next(p for p in service["spec"]["ports"] if p["name"] == "sidecar-health")
    assert (health["port"], health["targetPort"]) == (50052, 50052)


def test_example_with_a_unix_socket_and_a_regular_container(example: helm_python.Chart) -> None:
    values = {"sidecar": {"transport": "unix", "nativeSidecar": False, "device": "cuda"}}
    spec = pod(render(example, values))
    assert not spec.get("initContainers")
    app, sidecar = spec["containers"]
    assert sidecar["name"] == "transformers-sidecar"
    assert "restartPolicy" not in sidecar
    socket = "unix:/var/run/transformers-sidecar/sidecar.sock"
    assert env(sidecar)["SIDECAR_ADDRESS"] == socket
    assert env(app)["TRANSFORMERS_SIDECAR_ADDRESS"] == socket
    assert "sidecar-grpc" not in {p["name"] for p in sidecar["ports"]}
    shared = [m for m in app["volumeMounts"] if m["name"] == "sidecar-socket"]
    assert shared == [{"name": "sidecar-socket", "mountPath": "/var/run/transformers-sidecar"}]
    assert "sidecar-socket" in {m["name"] for m in sidecar["volumeMounts"]}
    assert spec["securityContext"]["fsGroup"] == 10001  # the socket's group, 0660
    # A regular container stops with the app: it serves through the app's drain first.
    assert sidecar["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert spec["terminationGracePeriodSeconds"] == 25
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert sidecar["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_sidecar_mode_pod_monitor(example: helm_python.Chart) -> None:
    monitor = {"enabled": True, "podSelector": {"app.kubernetes.io/name": "ticket-service"}}
    manifests = render(example, {"sidecar": {"metrics": {"monitor": monitor}}})
    (found,) = manifests["PodMonitor"]
    assert found["spec"]["podMetricsEndpoints"][0]["port"] == "sidecar-metrics"
    assert found["spec"]["selector"]["matchLabels"] == monitor["podSelector"]
    message = rejected(example, {"sidecar": {"metrics": {"monitor": {"enabled": True}}}})
    assert "set metrics.monitor.podSelector" in message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "gpu"}, "at '/device': value must be one of 'cpu', 'cuda'"),
        ({"config": {"grace_period": 3}}, "additional properties 'grace_period' not allowed"),
        ({"config": {"max_batch_size": 0}}, "at '/config/max_batch_size': minimum: got 0, want 1"),
        ({"config": {"address": "0.0.0.0:1"}}, "additional properties 'address' not allowed"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"transport": "vsock"}, "at '/transport': value must be one of 'tcp', 'unix'"),
        ({"models": []}, "at '/models': minItems"),
        ({"models": [{"name": "Triage", "path": "/m"}]}, "at '/models/0/name'"),
        ({"image": {"digest": "sha256:abc"}}, "at '/image/digest'"),
        ({"healthPort": 70000}, "at '/healthPort': maximum"),
        (
            {"models": [{"name": "x", "path": "/m", "pvc": {"claimName": "c"}}]},
            "model x: give exactly one of path, export, pvc, image; got path, pvc",
        ),
        ({"models": [{"name": "x"}]}, "model x: give exactly one of path, export, pvc, image"),
        ({"port": 50052}, "port, healthPort, metrics.port and http.port must differ"),
        ({"transport": "unix"}, "transport: unix works in sidecar mode only"),
        (
            {"models": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
            "model names must be unique",
        ),
        ({"defaultModel": "nope"}, 'defaultModel "nope" is not one of the models'),
        (
            {"service": {"port": 50052}},
            "service.port, healthPort, metrics.port and http.port must differ",
        ),
        (
            {"service": {"headless": True, "type": "LoadBalancer"}},
            "service.headless needs service.type ClusterIP",
        ),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
            "autoscaling.minReplicas 5 is above maxReplicas 3",
        ),
        ({"config": {"max_message_bytes": 2**31}}, "at '/config/max_message_bytes': maximum"),
        ({"probes": {"liveness": {"successThreshold": 2}}}, "'successThreshold' not allowed"),
        (
            {"models": [{"name": "x", "image": {"reference": "r/m:1", "subPath": "m"}}]},
            "'subPath' not allowed",
        ),
        ({"models": [{"name": "x", "path": "/a,b=/c"}]}, "at '/models/0/path'"),
        ({"otel": {"resourceAttributes": {"team": "a,b=c"}}}, "at '/otel/resourceAttributes/team'"),
        ({"resources": {"requests": {"cpu": "."}}}, "at '/resources/requests/cpu'"),
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
        (
            {"tls": {"secretName": "sidecar-tls", "clientAuth": True}},
            "tls.secretName, tls.clientAuth set but tls.enabled is false",
        ),
        ({"tls": {"clientCASecretName": "ca"}}, "tls.clientCASecretName set but tls.enabled"),
        (
            {"tls": {"enabled": True, "secretName": "s", "clientCASecretName": "ca"}},
            "tls.clientCASecretName is set but tls.clientAuth is false",
        ),
        ({"auth": {"tokenSecret": {"key": "api"}}}, "auth.tokenSecret.key is set but"),
        ({"tls": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"tls": {"enabled": True, "secretName": "Bad_Name"}}, "at '/tls/secretName'"),
        ({"auth": {"token": "s3cret"}}, "additional properties 'token' not allowed"),
        ({"config": {"tls_cert_file": "/x"}}, "additional properties 'tls_cert_file' not allowed"),
        ({"config": {"auth_token_file": "/x"}}, "additional properties 'auth_token_file' not"),
    ],
)
def test_bad_values_are_refused_at_render_time(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    assert message in rejected(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"transport": "unix", "socket": {"dir": "/tmp/"}}, "socket.dir must not be /tmp"),
        ({"transport": "unix", "socket": {"dir": "/" + "d" * 110}}, "Unix sockets allow 107"),
    ],
)
def test_bad_sidecar_values_are_refused(
    example: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    assert message in rejected(example, {"sidecar": values})


def test_queue_limits_the_server_would_refuse_fail_at_render_time(
    chart: helm_python.Chart,
) -> None:
    """The chart knows the server's defaults: a queue below them cannot start."""
    defaults = config.Settings()
    room = defaults.max_rerank_passages  # the larger of the two
    render(chart, {"config": {"max_queue_size": room}})
    short = rejected(chart, {"config": {"max_queue_size": room - 1}})
    assert f"max_queue_size {room - 1} is below config.max_rerank_passages {room}" in short
    calls = {"max_queue_size": defaults.max_client_batch_size - 1, "max_rerank_passages": 1}
    assert "below config.max_client_batch_size" in rejected(chart, {"config": calls})


def test_user_strings_stay_strings(chart: helm_python.Chart) -> None:
    """Names that YAML would retype (numbers, booleans, null) reach Kubernetes as strings."""
    models = [
        {"name": "a", "pvc": {"claimName": "1234", "subPath": "null"}},
        {
            "name": "b",
            "export": {"checkpoint": "org/m", "revision": "0123", "tokenSecret": {"name": "007"}},
        },
    ]
    otel = {"extraEnv": {"OTEL_BSP_MAX_QUEUE_SIZE": 1000000, "OTEL_TRACES_EXPORTER": "console"}}
    values = {"models": models, "otel": otel, "podAnnotations": {"prometheus.io/scrape": "false"}}
    manifests = render(chart, values)
    spec = pod(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["sidecar-model-a"]["persistentVolumeClaim"]["claimName"] == "1234"
    mount = next(m for m in server(spec)["volumeMounts"] if m["name"] == "sidecar-model-a")
    assert mount["subPath"] == "null"
    (export,) = spec["initContainers"]
    assert "--revision=0123" in export["args"]
    token = next(e for e in export["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "007"
    variables = env(server(spec))
    assert variables["OTEL_BSP_MAX_QUEUE_SIZE"] == "1000000"
    assert variables["OTEL_TRACES_EXPORTER"] == "console"  # honoured with no endpoint
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in variables
    # The user's annotations win over the chart's.
    annotations = manifests["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"


def test_threads_follow_the_cpu_limit_without_a_request(chart: helm_python.Chart) -> None:
    values = {"resources": {"requests": None, "limits": {"cpu": "3", "memory": "2Gi"}}}
    assert env(server(pod(render(chart, values))))["SIDECAR_INTRA_OP_THREADS"] == "3"
    values = {"config": {"intra_op_threads": 0}}  # 0: ONNX Runtime's own choice
    assert env(server(pod(render(chart, values))))["SIDECAR_INTRA_OP_THREADS"] == "0"


def test_an_app_chart_can_switch_the_dependency_off(example: helm_python.Chart) -> None:
    render(example, {"sidecar": {"enabled": True}})


def test_bad_values_of_the_dependency_fail_the_app_chart(example: helm_python.Chart) -> None:
    assert "at '/device'" in rejected(example, {"sidecar": {"device": "tpu"}})


def test_lint_is_clean(example_dir: Path) -> None:
    for path in (CHART, example_dir):
        result = helm_python.lint(path, strict=True, with_subcharts=True)
        # Severity 1 is informational (Helm suggests an icon); 2 and up are warnings, errors.
        assert [m for m in result["messages"] if m["severity"] >= 2] == [], path
        assert result["errors"] == []
    refused = helm_python.lint(CHART, {"device": "gpu"})
    assert any("value must be one of 'cpu', 'cuda'" in e for e in refused["errors"])


def test_schema_config_matches_the_server_settings() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    configurable = schema["properties"]["config"]["properties"]
    chart_sets = {"address", "models", "default_model", "device", "health_address"}
    chart_sets |= {"metrics_address", "http_address"}
    # Files the chart mounts from the Secrets named by tls and auth.
    chart_sets |= {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file"}
    settings = {f.name for f in dataclasses.fields(config.Settings)}
    assert set(configurable) == settings - chart_sets
    hints = typing.get_type_hints(config.Settings)
    kinds = {int: "integer", float: "number", str: "string", bool: "boolean"}
    for name, entry in configurable.items():
        assert entry["type"] == kinds[hints[name]], name
    assert configurable["backend"]["enum"] == list(config.BACKENDS)
    assert configurable["torch_dtype"]["enum"] == list(config.TORCH_DTYPES)
    assert configurable["log_format"]["enum"] == list(config.LOG_FORMATS)


def test_a_real_server_answers_the_probes_and_the_app_as_the_chart_configures_it(
    example: helm_python.Chart, minilm_dir: Path, tmp_path: Path
) -> None:
    """`sidecar serve` with the env the chart renders: every probe the kubelet would send
    gets SERVING, the app's address reaches the model, SIGTERM drains within the pod's grace."""
    health_port, metrics_port = free_port(), free_port()
    socket_dir = Path(tempfile.mkdtemp(prefix="sock"))  # short: socket paths stop at 107 bytes
    values = {
        "sidecar": {
            "transport": "unix",
            "socket": {"dir": str(socket_dir), "name": "sidecar.sock"},
            "models": [{"name": "minilm", "path": str(minilm_dir)}],
            "healthPort": health_port,
            "metrics": {"port": metrics_port},
            "config": {"grace_period_s": 2},
        }
    }
    spec = pod(render(example, values))
    sidecar, app = server(spec), spec["containers"][0]
    process = start_sidecar(tmp_path / "serve.log", env={**os.environ, **env(sidecar)})
    try:
        probes = f"127.0.0.1:{health_port}"
        wait_serving(probes, process)
        with grpc.insecure_channel(probes) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert sidecar[probe]["grpc"]["port"] == health_port
                request = health_pb2.HealthCheckRequest(service=sidecar[probe]["grpc"]["service"])
                assert check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(env(app)["TRANSFORMERS_SIDECAR_ADDRESS"]) as channel:
            answer = InferenceStub(channel).Embed(EmbedRequest(inputs=["refund"]), timeout=30)
        assert answer.dimensions == 384
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert b"sidecar_requests_total" in scraped.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=spec["terminationGracePeriodSeconds"]) == 0
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)
        shutil.rmtree(socket_dir)


def test_image_tags_follow_the_app_version() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == app_version()
    assert values["image"]["cudaTag"] == f"{app_version()}-cuda"
    assert values["exportImage"]["tag"] == f"{app_version()}-export"


def app_version() -> str:
    version: str = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return version


def test_a_real_server_with_the_charts_tls_and_token(
    chart: helm_python.Chart, minilm_dir: Path, tmp_path: Path
) -> None:
    """`sidecar serve` with the env the chart renders for tls and auth, each Secret volume
    laid out as the kubelet would (its items under the mount path): the probes answer in
    plain text without a token, and the API port wants mTLS and the token."""
    import trustme

    port, health_port, metrics_port = free_port(), free_port(), free_port()
    values = {
        "models": [{"name": "minilm", "path": str(minilm_dir)}],
        "port": port,
        "healthPort": health_port,
        "metrics": {"port": metrics_port},
        "tls": {"enabled": True, "secretName": "sidecar-tls", "clientAuth": True},
        "auth": {"tokenSecret": {"name": "sidecar-token", "key": "api-token"}},
        "config": {"grace_period_s": 1},
    }
    spec = pod(render(chart, values))
    container = server(spec)
    service_name = "support-transformers-sidecar.helpdesk.svc"
    ca = trustme.CA()
    issued = ca.issue_cert(service_name)
    secrets = {
        "sidecar-tls": {
            "tls.crt": b"".join(blob.bytes() for blob in issued.cert_chain_pems),
            "tls.key": issued.private_key_pem.bytes(),
            "ca.crt": ca.cert_pem.bytes(),
        },
        "sidecar-token": {"api-token": b"chart-token-0123456789\n"},
    }
    variables = env(container)
    volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    for mount in container["volumeMounts"]:
        if mount["name"] not in volumes:
            continue
        local = tmp_path / mount["name"]
        local.mkdir()
        secret = volumes[mount["name"]]
        for item in secret["items"]:
            (local / item["path"]).write_bytes(secrets[secret["secretName"]][item["key"]])
        for name, value in variables.items():
            if value.startswith(mount["mountPath"] + "/"):
                variables[name] = str(local) + value.removeprefix(mount["mountPath"])
    process = start_sidecar(tmp_path / "serve.log", env={**os.environ, **variables})
    try:
        probes = f"127.0.0.1:{health_port}"
        wait_serving(probes, process)  # plain text, no token: as the kubelet probes
        with grpc.insecure_channel(probes) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                request = health_pb2.HealthCheckRequest(service=container[probe]["grpc"]["service"])
                assert check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        caller = ca.issue_cert("ticket-service@helpdesk")
        client, client_key = caller.cert_chain_pems[0].bytes(), caller.private_key_pem.bytes()
        credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes(), client_key, client)
        options = [("grpc.ssl_target_name_override", service_name)]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            embed = InferenceStub(channel).Embed
            token = (("authorization", "Bearer chart-token-0123456789"),)
            answer = embed(EmbedRequest(inputs=["refund"]), metadata=token, timeout=30)
            assert answer.dimensions == 384
            with pytest.raises(grpc.RpcError) as refused:
                embed(EmbedRequest(inputs=["refund"]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
            InferenceStub(channel).Embed(EmbedRequest(inputs=["refund"]), timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=spec["terminationGracePeriodSeconds"]) == 0
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)

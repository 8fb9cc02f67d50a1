"""The Kubernetes and KServe manifests: rendered by `kubectl kustomize`, validated offline against the
Kubernetes schemas (kubernetes-validate), the custom resources' required fields checked here, and the
names, labels, ports and sizes agreeing across objects and with the repository.

What this does not show: that a cluster runs them. No cluster, container runtime or GPU is available
to these tests; the CRDs (ServiceMonitor, PrometheusRule, ScaledObject, InferenceService) are checked
against the fields their operators require, not against their full schemas.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import offramp.backend
from offramp.backend.contract import FLAG_DEGRADED
from offramp.backend.policy import Policy
from offramp.backend.text import TEXT_INPUT
from offramp.build.execution_env import shared_memory_bytes, triton_server_flags
from offramp.build.repository import OnnxTensorRT, RepositoryOptions, write_repository
from offramp.client.cli.health import DOWN, LIVE, READY
from offramp.client.serving import health, http_probe
from offramp.client.serving.kubernetes import (
    PROBE_FILE,
    KubernetesOptions,
    RepositoryNeeds,
    queue_time_query,
    storage_notes,
    write_kubernetes,
)

KUBERNETES_VERSION = "1.32.0"  # the kubectl installed here
KUSTOMIZATIONS = ("base", "overlays/pvc", "overlays/s3", "overlays/keda", "kserve")
# Custom resources: the fields their operators require (their CRDs' `required`), checked by hand.
CRD_REQUIRED = {
    "ServiceMonitor": [("spec", "selector"), ("spec", "endpoints")],
    "PrometheusRule": [("spec", "groups")],
    "ScaledObject": [("spec", "scaleTargetRef", "name"), ("spec", "triggers")],
    "InferenceService": [("spec", "predictor", "model", "modelFormat", "name")],
}
MOUNT = "/mnt/models"


@pytest.fixture(scope="module")
def repositories(quick_cnn, tmp_path_factory):
    """A CPU repository (the embedded target) and a GPU one (ONNX Runtime with TensorRT), both naming
    their Python environment under the mount path, as an operator writes them for the cluster."""
    artifacts, directory = quick_cnn
    root = tmp_path_factory.mktemp("kube")
    policy = Policy.fixed(artifacts.fingerprint, artifacts.num_exits)
    cpu = RepositoryOptions(
        execution_env=Path(MOUNT) / "offramp_env", orchestrator_instances=2, segment_instances=1
    )
    gpu = replace(cpu, target="triton-onnx", onnx_tensorrt=OnnxTensorRT(engine_cache_path="/cache/trt"))
    write_repository(artifacts, directory, policy, root / "cpu", cpu)
    write_repository(artifacts, directory, policy, root / "gpu", gpu)
    return root, artifacts, cpu


def rendered(out: Path, kustomization: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    result = subprocess.run(
        ["kubectl", "kustomize", str(out / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def crd_problems(document: dict) -> list[str]:
    problems = []
    for path in CRD_REQUIRED[document["kind"]]:
        node = document
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not node:
            problems.append(f"{document['kind']}: {'.'.join(path)} is missing")
    return problems


@pytest.fixture(scope="module")
def manifests(repositories, tmp_path_factory):
    root, _, _ = repositories
    out = tmp_path_factory.mktemp("manifests")
    options = KubernetesOptions(s3_url="s3://models/offramp", monitoring_labels=(("release", "prometheus"),))
    write_kubernetes(root / "cpu", out, options)
    return out, {k: rendered(out, k) for k in KUSTOMIZATIONS}


def by_kind(documents: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


def test_every_kustomization_renders_and_validates(manifests):
    """Built-in kinds against the bundled Kubernetes schemas (strict: no unknown field); custom resources
    by their required fields. Each kustomization holds what it should."""
    _, documents = manifests
    # Every overlay is the base plus its storage or its scaler.
    base = {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    expected = {
        "base": base,
        "overlays/pvc": base | {"PersistentVolumeClaim"},
        "overlays/s3": base,
        "overlays/keda": base - {"HorizontalPodAutoscaler"} | {"ScaledObject", "PersistentVolumeClaim"},
        "kserve": {"InferenceService", "ConfigMap"},
    }
    validated = set()
    for kustomization, objects in documents.items():
        assert {d["kind"] for d in objects} == expected[kustomization], kustomization
        for document in objects:
            if document["kind"] in CRD_REQUIRED:
                assert not crd_problems(document)
                continue
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            validated.add(document["kind"])
    assert validated == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "PersistentVolumeClaim",
    }


def test_the_validation_catches_a_broken_object(manifests):
    """The checks above can fail: a misspelt field and a missing selector are caught."""
    _, documents = manifests
    deployment = next(d for d in documents["overlays/pvc"] if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    monitor = next(d for d in documents["base"] if d["kind"] == "ServiceMonitor")
    assert crd_problems({**monitor, "spec": {"endpoints": monitor["spec"]["endpoints"]}})


def test_names_labels_and_ports_agree_across_objects(manifests):
    _, documents = manifests
    objects = by_kind(documents["overlays/pvc"])
    (deployment,) = objects["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    pod_labels = pod["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    services = {s["metadata"]["name"]: s for s in objects["Service"]}
    name = deployment["metadata"]["name"]
    assert set(services) == {name, f"{name}-replicas"}
    assert services[f"{name}-replicas"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} == set(container_ports)

    # Prometheus scrapes the load-balanced Service alone (the headless one would double every target).
    (monitor,) = objects["ServiceMonitor"]
    selected = [
        s
        for s in services.values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [name]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in selected[0]["spec"]["ports"]
    }
    assert monitor["metadata"]["labels"]["release"] == "prometheus"

    (autoscaler,) = objects["HorizontalPodAutoscaler"]
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }

    # Volumes: every mount has its volume; the claim, the probe and the dashboard exist.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    (claim,) = objects["PersistentVolumeClaim"]
    assert volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config_maps = {c["metadata"]["name"]: c for c in objects["ConfigMap"]}
    probe_map = config_maps[volumes["offramp-probe"]["configMap"]["name"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert f"--model-repository={mounts['model-repository']}" in container["args"]
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[1] == f"{mounts['offramp-probe']}/{PROBE_FILE}" and PROBE_FILE in probe_map["data"]
        assert command[command.index("--url") + 1] == f"http://127.0.0.1:{container_ports['http']}"
    assert container["startupProbe"]["httpGet"]["port"] == container_ports["http"]
    assert any(c["metadata"]["labels"].get("grafana_dashboard") == "1" for c in config_maps.values())
    # The admin key the restricted APIs demand comes from the Secret the operator creates.
    (key,) = [e for e in container["env"] if e["name"] == "OFFRAMP_ADMIN_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == f"{name}-admin-key"
    assert all("$(OFFRAMP_ADMIN_KEY)" in a for a in container["args"] if "restricted" in a)

    keda = by_kind(documents["overlays/keda"])
    assert "HorizontalPodAutoscaler" not in keda
    assert keda["ScaledObject"][0]["spec"]["scaleTargetRef"]["name"] == name
    assert f'job="{name}"' in keda["ScaledObject"][0]["spec"]["triggers"][0]["metadata"]["query"]

    (s3,) = by_kind(documents["overlays/s3"])["Deployment"]
    (s3_container,) = s3["spec"]["template"]["spec"]["containers"]
    assert "--model-repository=s3://models/offramp" in s3_container["args"]
    assert "model-repository" not in {v["name"] for v in s3["spec"]["template"]["spec"]["volumes"]}

    kserve = by_kind(documents["kserve"])
    (inference,) = kserve["InferenceService"]
    predictor = inference["spec"]["predictor"]
    assert (
        predictor["model"]["runtime"] == "kserve-tritonserver"
        and predictor["model"]["storageUri"] == "s3://models/offramp"
    )
    assert {v["configMap"]["name"] for v in predictor["volumes"] if "configMap" in v} == {
        c["metadata"]["name"] for c in kserve["ConfigMap"]
    }
    assert "--url" in predictor["model"]["readinessProbe"]["exec"]["command"]
    assert "http://127.0.0.1:8080" in predictor["model"]["readinessProbe"]["exec"]["command"]


def test_flags_shared_memory_and_gpus_follow_the_repository(repositories, tmp_path):
    """The /dev/shm size and the Python backend's flags are those the README derives for `docker run`,
    from the repository's own instance counts, batch size and largest tensor row; a GPU repository gets
    a GPU and the CUDA memory pool."""
    root, artifacts, cpu = repositories
    options = KubernetesOptions()
    needs = RepositoryNeeds.read(root / "cpu")
    python_instances = cpu.orchestrator_instances + cpu.segment_instances * (artifacts.num_exits + 1)
    largest_hidden = max(4 * math.prod(s.hidden.shape) for s in artifacts.segments)
    assert needs.python_instances == python_instances and needs.largest_row_bytes == largest_hidden
    expected_shm = shared_memory_bytes(
        python_instances, cpu.max_batch_size, largest_hidden, options.shm_default_bytes
    )
    write_kubernetes(root / "cpu", tmp_path / "cpu", options)
    cpu_deployment = yaml.safe_load((tmp_path / "cpu" / "base" / "deployment.yaml").read_text())
    pod = cpu_deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["sizeLimit"] == f"{-(-expected_shm // 2**20)}Mi"
    for flag in triton_server_flags(options.shm_default_bytes, options.shm_growth_bytes):
        assert flag in container["args"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert not any(a.startswith("--cuda-memory-pool") for a in container["args"])
    # The memory limit holds the server's memory and /dev/shm, which counts against it.
    assert (
        container["resources"]["limits"]["memory"]
        == f"{-(-(options.memory_mib * 2**20 + expected_shm) // 2**20)}Mi"
    )

    write_kubernetes(root / "gpu", tmp_path / "gpu", options)
    gpu_container = yaml.safe_load((tmp_path / "gpu" / "base" / "deployment.yaml").read_text())["spec"][
        "template"
    ]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert f"--cuda-memory-pool-byte-size=0:{options.cuda_pool_bytes}" in gpu_container["args"]
    # Only the orchestrator is a Python model there: two instances, two regions.
    assert RepositoryNeeds.read(root / "gpu").python_instances == cpu.orchestrator_instances


def test_the_prometheus_rule_and_the_autoscaling_queries(manifests):
    out, documents = manifests
    (rule,) = by_kind(documents["base"])["PrometheusRule"]
    shipped = yaml.safe_load(
        (Path(offramp.backend.__file__).parent / "monitoring" / "prometheus_alerts.yml").read_text()
    )
    assert rule["spec"]["groups"] == shipped["groups"]
    adapter = yaml.safe_load((out / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    (autoscaler,) = by_kind(documents["base"])["HorizontalPodAutoscaler"]
    assert adapter["name"]["as"] == autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"]
    matchers = '{<<.LabelMatchers>>,model="fashion_cnn"}'
    assert adapter["metricsQuery"] == (
        f"sum by (<<.GroupBy>>) (delta(nv_inference_queue_duration_us{matchers}[30s])) / "
        f"(1 + sum by (<<.GroupBy>>) (delta(nv_inference_request_success{matchers}[30s])))"
    )
    assert queue_time_query("m") == (
        'sum (delta(nv_inference_queue_duration_us{model="m"}[30s])) / '
        '(1 + sum (delta(nv_inference_request_success{model="m"}[30s])))'
    )


def test_storage_notes_say_which_overlay_finds_the_python_environment(repositories):
    root, _, _ = repositories
    needs = RepositoryNeeds.read(root / "cpu")
    (note,) = storage_notes(needs, KubernetesOptions())
    assert "overlays/pvc and kserve find it" in note and "overlays/s3 does not" in note
    (outside,) = storage_notes(replace(needs, execution_envs=("/opt/env",)), KubernetesOptions())
    assert "no replica will find it" in outside
    (inside,) = storage_notes(
        replace(needs, execution_envs=("$$TRITON_MODEL_DIRECTORY/env.tar.gz",)), KubernetesOptions()
    )
    assert "every overlay finds it" in inside


def test_the_probe_restates_offramps_constants_and_runs_on_the_standard_library(manifests):
    """The probe imports nothing of offramp: its restated constants must be offramp's, and it must run
    in an isolated interpreter (no site-packages), as in a stock Triton image."""
    out, _ = manifests
    assert (http_probe.FLAG_DEGRADED, http_probe.TEXT_INPUT, http_probe.CANARY_TEXT) == (
        FLAG_DEGRADED,
        TEXT_INPUT,
        health.CANARY_TEXT,
    )
    assert (http_probe.READY, http_probe.LIVE, http_probe.DOWN) == (READY, LIVE, DOWN)
    assert (out / "base" / PROBE_FILE).read_text() == Path(http_probe.__file__).read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(out / "base" / PROBE_FILE),
            "--url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == DOWN, result.stderr
    assert "metadata FAILED" in result.stdout


def test_the_dashboard_aggregates_by_pod_and_ships_as_it_is(manifests):
    """Every query can be narrowed to some pods (`$pod`, all by default: on one server there is no pod
    label, and `=~".*"` matches its absence); the per-replica panels group by pod; the ConfigMap carries
    the file unchanged."""
    _, documents = manifests
    source = Path(offramp.backend.__file__).parent / "monitoring" / "grafana_dashboard.json"
    dashboard = json.loads(source.read_text())
    assert {"name": "pod", "allValue": ".*", "includeAll": True}.items() <= next(
        v for v in dashboard["templating"]["list"] if v["name"] == "pod"
    ).items()
    expressions = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    assert all('pod=~"$pod"' in e for exprs in expressions.values() for e in exprs)
    by_pod = [title for title in expressions if "by pod" in title]
    assert len(by_pod) >= 4 and all("by (pod" in e for t in by_pod for e in expressions[t])
    (shipped,) = [c for c in by_kind(documents["base"])["ConfigMap"] if "grafana-dashboard.json" in c["data"]]
    assert json.loads(shipped["data"]["grafana-dashboard.json"]) == dashboard

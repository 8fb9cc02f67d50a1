"""Kubernetes and KServe manifests for a generated repository on NVIDIA's stock Triton image.

``write_kubernetes`` (``offramp deploy kubernetes``) writes a Kustomize tree; every object is a Python
dict built here and dumped to YAML:

    base/                 Deployment (stock tritonserver), Service (HTTP, gRPC, metrics), headless Service
                          (one address per replica, for `offramp policy --fleet` and the client),
                          HorizontalPodAutoscaler, ServiceMonitor, PrometheusRule, ConfigMaps (Grafana
                          dashboard, the probe); no repository: an overlay adds it
    overlays/pvc/         the repository on a ReadWriteMany PersistentVolumeClaim, mounted at /mnt/models
    overlays/s3/          the repository in object storage (--model-repository=s3://...)
    overlays/keda/        overlays/pvc scaled by a KEDA ScaledObject instead of the HPA
    kserve/               an InferenceService on KServe's kserve-tritonserver runtime
    prometheus-adapter-values.yaml   the rule that gives the HPA its metric (Helm values)

What the server needs is read off the repository (``RepositoryNeeds``): the Python-model instances and
the largest tensor row give the /dev/shm size and the Python backend's flags (the estimate and flags of
``offramp.build.execution_env``, as the README derives them for ``docker run``), GPU instance groups
give the GPU request and the CUDA memory pool, and the orchestrators are what the probes ask.

Decisions, and why:

- **Probes.** Triton's ``/v2/health/ready`` and model-ready endpoints stay 200 while a dead
  Python-backend stub fails every request, and a stock image has no ``offramp serve`` to supervise the
  stubs. Readiness and liveness are therefore exec probes running ``http_probe.py`` (the canaries of
  ``offramp health`` over HTTP, standard library only) with the image's ``python3``, from a ConfigMap:
  readiness takes a replica out of the Service while its answers are below full quality, liveness
  restarts the container (fresh stubs: Kubernetes' self-healing in place of the supervisor) once it
  answers nothing. The startup probe, which only waits for loading, is Triton's ``/v2/health/ready``.
- **Explicit model control** with ``--load-model=*``: policy versions are rolled out one replica at a
  time over the model-control API (``offramp.client.serving.fleet``), which poll mode would not allow;
  that API demands the ``offramp-admin-key`` header with the key from a Secret the operator creates.
- **/dev/shm** is a memory-backed emptyDir of the estimated size; it counts against the pod's memory,
  so the memory limit is the server's memory plus it. An emptyDir outlives a container restart, and a
  killed server leaves its stubs' regions there: the container removes them before it starts Triton.
- **Autoscaling** on queue time per request of the orchestrator, through prometheus-adapter (HPA) or
  KEDA (both given the same query from ``queue_time_query``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

import offramp.backend
from offramp.backend.orchestrator import SPEC_FILE, OrchestratorSpec, ServingOptions
from offramp.build.execution_env import shared_memory_bytes, triton_server_flags
from offramp.client.cli.options import option
from offramp.client.serving.server import ADMIN_KEY_HEADER, RESTRICTED_APIS, SHM_REGION_PREFIX

MONITORING = Path(offramp.backend.__file__).parent / "monitoring"
PROBE_SOURCE = Path(__file__).with_name("http_probe.py")
PROBE_FILE = "offramp_probe.py"
PROBE_DIR = "/opt/offramp"
DASHBOARD_FILE = "grafana-dashboard.json"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own
KSERVE_HTTP_PORT = 8080  # what KServe's kserve-tritonserver runtime gives Triton
KSERVE_RUNTIME = "kserve-tritonserver"
EXECUTION_ENV_PARAMETER = "EXECUTION_ENV_PATH"
MODEL_DIRECTORY_VARIABLE = "$$TRITON_MODEL_DIRECTORY"  # Triton resolves it to the model's own folder
QUEUE_METRIC = "offramp_queue_time_per_request_us"
ADMIN_KEY_ENV = "OFFRAMP_ADMIN_KEY"
# Before Triton starts: no process of this container is running, so every region in the pod's /dev/shm
# is a leftover of a server killed in an earlier run of the container (the emptyDir outlives it).
REMOVE_LEFTOVER_REGIONS = f'rm -f /dev/shm/{SHM_REGION_PREFIX}*; exec tritonserver "$@"'
# Bytes per element; raw text (TYPE_STRING) is left out: its rows are small beside the hidden states.
_BYTES = {
    pb.DataType.Value(f"TYPE_{name}"): size
    for size, names in {
        1: ("BOOL", "UINT8", "INT8"),
        2: ("UINT16", "INT16", "FP16", "BF16"),
        4: ("UINT32", "INT32", "FP32"),
        8: ("UINT64", "INT64", "FP64"),
    }.items()
    for name in names
}


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, not {text!r}")
    return key, value


@dataclass(frozen=True)
class KubernetesOptions:
    """How the service runs on the cluster; each field is also an option of ``offramp deploy kubernetes``."""

    name: str = option("", help="the objects' name (default: offramp-<model>)")
    image: str = option("nvcr.io/nvidia/tritonserver:24.10-py3", help="the Triton image (24.10: Triton 2.51)")
    replicas: int = option(2, help="replicas, and the autoscalers' minimum")
    max_replicas: int = option(8, help="the autoscalers' maximum")
    queue_time_target_us: int = option(
        20_000, help="autoscaling target: queue time per request, microseconds"
    )
    cpu: str = option("4", help="CPU requested per replica")
    memory_mib: int = option(8192, help="memory per replica for the server and its stubs; /dev/shm is added")
    gpus: int = option(-1, help="GPUs per replica (default: 1 where the repository has GPU models, else 0)")
    mount_path: str = option("/mnt/models", help="where the repository is mounted (KServe's own path)")
    claim_name: str = option("", help="the repository's PersistentVolumeClaim (default: <name>-models)")
    storage_size: str = option("20Gi", help="the claim's size (overlays/pvc)")
    storage_class: str = option("", help="the claim's storage class (default: the cluster's)")
    s3_url: str = option("", help="overlays/s3 and kserve: s3://bucket/path of the repository")
    shm_default_bytes: int = option(64 << 20, help="the Python backend's shm-default-byte-size")
    shm_growth_bytes: int = option(64 << 20, help="the Python backend's shm-growth-byte-size")
    cuda_pool_bytes: int = option(
        256 << 20, help="--cuda-memory-pool-byte-size on GPU 0, where there are GPUs"
    )
    exit_timeout_s: int = option(30, help="Triton's drain on SIGTERM (--exit-timeout-secs)")
    startup_timeout_s: int = option(900, help="how long the startup probe waits for every model to load")
    prometheus_url: str = option("http://prometheus-operated.monitoring.svc:9090", help="for KEDA's trigger")
    monitoring_labels: tuple[tuple[str, str], ...] = option(
        (),
        flag="--monitoring-label",
        parse=_label,
        repeatable=True,
        help="KEY=VALUE on the ServiceMonitor and PrometheusRule, for Prometheus' selectors (repeatable)",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= self.max_replicas:
            raise ValueError("replicas must be at least 1 and at most max_replicas")
        if self.s3_url and not self.s3_url.startswith("s3://"):
            raise ValueError(f"--s3-url must start with s3://, not {self.s3_url!r}")


# --- What the repository needs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RepositoryNeeds:
    """What a generated repository asks of the server, read off its ``config.pbtxt`` files."""

    orchestrators: tuple[str, ...]  # the models the probes ask
    python_instances: int  # Python-backend instances: one /dev/shm region each
    max_batch: int
    largest_row_bytes: int  # the largest tensor row a stub sends or receives
    gpu_models: tuple[str, ...]
    execution_envs: tuple[str, ...]  # the EXECUTION_ENV_PATH values

    @classmethod
    def read(cls, repository: Path) -> RepositoryNeeds:
        configs = [
            text_format.Parse(path.read_text(), pb.ModelConfig())
            for path in sorted(Path(repository).glob("*/config.pbtxt"))
        ]
        if not configs:
            raise ValueError(f"{repository} holds no model (no <model>/config.pbtxt)")
        parameters = {c.name: {k: v.string_value for k, v in c.parameters.items()} for c in configs}
        orchestrators = tuple(c.name for c in configs if ServingOptions.describes(parameters[c.name]))
        if not orchestrators:
            raise ValueError(f"{repository} holds no offramp orchestrator model")
        sequence = max(_max_sequence_length(Path(repository) / name) for name in orchestrators)

        def row_bytes(tensor: Any) -> int:
            return _BYTES.get(tensor.data_type, 0) * math.prod(sequence if d < 0 else d for d in tensor.dims)

        python = [c for c in configs if c.backend == "python"]
        return cls(
            orchestrators=orchestrators,
            python_instances=sum(g.count for c in python for g in c.instance_group),
            max_batch=max(c.max_batch_size for c in configs),
            largest_row_bytes=max(row_bytes(t) for c in configs for t in [*c.input, *c.output]),
            gpu_models=tuple(
                c.name
                for c in configs
                if any(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in c.instance_group)
            ),
            execution_envs=tuple(
                sorted(
                    {p[EXECUTION_ENV_PARAMETER] for p in parameters.values() if EXECUTION_ENV_PARAMETER in p}
                )
            ),
        )

    def shm_bytes(self, options: KubernetesOptions) -> int:
        """/dev/shm for the pod: ``offramp.build.execution_env.shared_memory_bytes``."""
        return shared_memory_bytes(
            self.python_instances, self.max_batch, self.largest_row_bytes, options.shm_default_bytes
        )

    def gpus(self, options: KubernetesOptions) -> int:
        return options.gpus if options.gpus >= 0 else int(bool(self.gpu_models))


def _max_sequence_length(model_dir: Path) -> int:
    """The longest a variable axis gets (a text model's token count), from the newest version's spec; 1
    where the model has no variable axis."""
    versions = sorted(
        int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / SPEC_FILE).exists()
    )
    if not versions:
        return 1
    spec = OrchestratorSpec.load(model_dir / str(versions[-1]) / SPEC_FILE)
    lengths = [spec.text.max_length] if spec.text else []
    lengths += [t.max_length for t in spec.inputs if t.max_length]
    return max(lengths, default=1)


def storage_notes(needs: RepositoryNeeds, options: KubernetesOptions) -> list[str]:
    """Whether each way of serving the repository finds the Python environment its configs name."""
    notes = []
    for env in needs.execution_envs or ("",):
        if not env:
            notes.append(
                "the Python models name no EXECUTION_ENV_PATH: the image's own Python must have "
                "NumPy < 2 and offramp (README, 'Serving on a stock Triton')"
            )
        elif env.startswith(MODEL_DIRECTORY_VARIABLE):
            notes.append(f"EXECUTION_ENV_PATH {env} is inside each model folder: every overlay finds it")
        elif Path(env).is_relative_to(options.mount_path):
            notes.append(
                f"EXECUTION_ENV_PATH {env} is under {options.mount_path}: overlays/pvc and kserve find it; "
                f"overlays/s3 does not (put it in the orchestrator's folder, {MODEL_DIRECTORY_VARIABLE}/...)"
            )
        else:
            notes.append(
                f"EXECUTION_ENV_PATH {env} is outside {options.mount_path}: no replica will find it; "
                f"rewrite the repository with execution_env under {options.mount_path}"
            )
    return notes


# --- The objects ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    """The names every object refers to, derived once from the options and the repository."""

    options: KubernetesOptions
    needs: RepositoryNeeds
    name: str = field(init=False)

    def __post_init__(self) -> None:
        default = "offramp-" + self.needs.orchestrators[0].replace("_", "-").lower()
        object.__setattr__(self, "name", self.options.name or default)

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "offramp", "app.kubernetes.io/instance": self.name}

    @property
    def labels(self) -> dict[str, str]:
        return {**self.selector, "app.kubernetes.io/component": "triton"}

    @property
    def claim(self) -> str:
        return self.options.claim_name or f"{self.name}-models"

    @property
    def admin_secret(self) -> str:
        return f"{self.name}-admin-key"

    @property
    def s3_secret(self) -> str:
        return f"{self.name}-s3"

    @property
    def probe_config_map(self) -> str:
        return f"{self.name}-probe"

    def metadata(self, suffix: str = "", labels: Mapping[str, str] = {}) -> dict[str, Any]:
        return {"name": self.name + suffix, "labels": {**self.labels, **labels}}


def triton_args(service: Service) -> list[str]:
    """tritonserver's options, but the repository's (the storage overlays add it) and the ports."""
    options, needs = service.options, service.needs
    restricted = (
        f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}=$({ADMIN_KEY_ENV})"  # Kubernetes expands $(VAR)
    )
    cuda_pool = options.cuda_pool_bytes if needs.gpus(options) else None
    return [
        "--model-control-mode=explicit",
        "--load-model=*",
        # The generated configs are complete; auto-completion would start every Python stub twice.
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api={restricted}",
        *triton_server_flags(options.shm_default_bytes, options.shm_growth_bytes, cuda_pool),
    ]


def _mib(size: int) -> str:
    return f"{math.ceil(size / 2**20)}Mi"


def probes(service: Service, http_port: int) -> dict[str, Any]:
    """Startup on Triton's readiness (every model loaded); readiness and liveness from the canaries."""
    url = f"http://127.0.0.1:{http_port}"
    canary = [
        "python3",
        f"{PROBE_DIR}/{PROBE_FILE}",
        "--url",
        url,
        *(a for model in service.needs.orchestrators for a in ("--model", model)),
    ]
    period = 10
    return {
        "startupProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": http_port},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(service.options.startup_timeout_s / period),
        },
        # Two canaries of at most 4 s each per model, then the verdict.
        "readinessProbe": {
            "exec": {"command": canary},
            "periodSeconds": period,
            "timeoutSeconds": 10,
            "failureThreshold": 2,
        },
        # Restart only a container that has answered nothing for two minutes: a loaded replica is slow,
        # not dead, and a restart would only add the load to the others.
        "livenessProbe": {
            "exec": {"command": [*canary, "--live"]},
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 4,
        },
    }


def resources(service: Service) -> dict[str, Any]:
    options = service.options
    memory = _mib(options.memory_mib * 2**20 + service.needs.shm_bytes(options))
    spec: dict[str, Any] = {"requests": {"cpu": options.cpu, "memory": memory}, "limits": {"memory": memory}}
    gpus = service.needs.gpus(options)
    if gpus:
        spec["requests"]["nvidia.com/gpu"] = spec["limits"]["nvidia.com/gpu"] = str(gpus)
    return spec


def _container_environment(service: Service) -> list[dict[str, Any]]:
    return [
        # Every stub is a process; default thread pools start a thread per core in each (README, 'Threads').
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": service.admin_secret, "key": "key"}}},
    ]


def _pod_volumes(service: Service) -> list[dict[str, Any]]:
    return [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": _mib(service.needs.shm_bytes(service.options))},
        },
        {"name": "offramp-probe", "configMap": {"name": service.probe_config_map}},
    ]


_POD_MOUNTS = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "offramp-probe", "mountPath": PROBE_DIR}]


def deployment(service: Service) -> dict[str, Any]:
    container = {
        "name": "triton",
        "image": service.options.image,
        "command": ["/bin/sh", "-c", REMOVE_LEFTOVER_REGIONS, "tritonserver"],
        "args": triton_args(service),
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "env": _container_environment(service),
        "resources": resources(service),
        "volumeMounts": list(_POD_MOUNTS),
        **probes(service, PORTS["http"]),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": service.metadata(),
        "spec": {
            "replicas": service.options.replicas,
            "selector": {"matchLabels": service.selector},
            # A new pod is ready before an old one goes: no capacity lost during an image update.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": service.labels},
                "spec": {
                    # Triton drains for --exit-timeout-secs on SIGTERM; then the stubs unlink their regions.
                    "terminationGracePeriodSeconds": service.options.exit_timeout_s + 15,
                    "containers": [container],
                    "volumes": _pod_volumes(service),
                },
            },
        },
    }


def services(service: Service) -> list[dict[str, Any]]:
    """The load-balanced Service, and a headless one that resolves to every ready replica: a gRPC
    connection sticks to one pod, so clients that spread requests (``OfframpClient`` with several
    addresses) and ``offramp policy --fleet`` need the replicas' own addresses."""
    ports = [{"name": name, "port": port, "targetPort": name} for name, port in PORTS.items()]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": service.metadata(),
            "spec": {"selector": service.selector, "ports": ports},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": service.metadata("-replicas", {"app.kubernetes.io/component": "replicas"}),
            "spec": {"clusterIP": "None", "selector": service.selector, "ports": ports},
        },
    ]


def queue_time_query(model: str, matchers: Sequence[str] = (), group_by: str = "") -> str:
    """Queue time per request of ``model`` over the last 30 s, in microseconds (NVIDIA's autoscaling
    query): the growth of Triton's cumulative queue time over that of its successful requests, plus one
    so that an idle replica reads 0."""
    selector = "{" + ",".join([*matchers, f'model="{model}"']) + "}"
    total = f"sum by ({group_by}) " if group_by else "sum "
    return (
        f"{total}(delta(nv_inference_queue_duration_us{selector}[30s])) / "
        f"(1 + {total}(delta(nv_inference_request_success{selector}[30s])))"
    )


def horizontal_pod_autoscaler(service: Service) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": service.metadata(),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service.name},
            "minReplicas": service.options.replicas,
            "maxReplicas": service.options.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(service.options.queue_time_target_us),
                        },
                    },
                }
            ],
            # A replica takes minutes to load its models: scale down slowly, or the next burst waits.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def prometheus_adapter_values(service: Service) -> dict[str, Any]:
    """Helm values for prometheus-community/prometheus-adapter: the per-pod metric the HPA reads."""
    model = service.needs.orchestrators[0]
    return {
        "rules": {
            "custom": [
                {
                    "seriesQuery": f'nv_inference_queue_duration_us{{namespace!="",pod!="",model="{model}"}}',
                    "resources": {
                        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
                    },
                    "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_METRIC},
                    "metricsQuery": queue_time_query(model, ["<<.LabelMatchers>>"], "<<.GroupBy>>"),
                }
            ],
        },
    }


def scaled_object(service: Service) -> dict[str, Any]:
    """KEDA's alternative to the HPA: the fleet's queue time per request against the same target."""
    # Prometheus' job label is the Service's name for targets a ServiceMonitor finds.
    query = queue_time_query(service.needs.orchestrators[0], [f'job="{service.name}"'])
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": service.metadata(),
        "spec": {
            "scaleTargetRef": {"name": service.name},
            "minReplicaCount": service.options.replicas,
            "maxReplicaCount": service.options.max_replicas,
            "triggers": [
                {
                    "type": "prometheus",
                    # The query is already a mean per request: compared as it is, not divided by the replicas.
                    "metricType": "Value",
                    "metadata": {
                        "serverAddress": service.options.prometheus_url,
                        "query": query,
                        "threshold": str(service.options.queue_time_target_us),
                    },
                }
            ],
        },
    }


def service_monitor(service: Service) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": service.metadata(labels=dict(service.options.monitoring_labels)),
        "spec": {
            "selector": {"matchLabels": service.labels},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def prometheus_rule(service: Service) -> dict[str, Any]:
    """The alert rules of ``python_backend/monitoring/prometheus_alerts.yml``, as the operator's object."""
    import yaml

    groups = yaml.safe_load((MONITORING / "prometheus_alerts.yml").read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": service.metadata(labels=dict(service.options.monitoring_labels)),
        "spec": {"groups": groups},
    }


def persistent_volume_claim(service: Service) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # Every replica mounts it, on whichever node it runs: NFS, CephFS, EFS, Filestore and the like.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": service.options.storage_size}},
    }
    if service.options.storage_class:
        spec["storageClassName"] = service.options.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": service.claim, "labels": service.labels},
        "spec": spec,
    }


def _s3_url(service: Service) -> str:
    return service.options.s3_url or "s3://REPLACE-WITH-BUCKET/model_repository"


def inference_service(service: Service) -> dict[str, Any]:
    """The same server on KServe: the runtime runs tritonserver on ``/mnt/models`` (``storageUri``, the
    claim or ``--s3-url``); RawDeployment mode, since Knative allows neither the memory-backed /dev/shm
    nor exec probes."""
    options = service.options
    storage = options.s3_url or f"pvc://{service.claim}/"
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            **service.metadata(),
            "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"},
        },
        "spec": {
            "predictor": {
                "minReplicas": options.replicas,
                "maxReplicas": options.max_replicas,
                "terminationGracePeriodSeconds": options.exit_timeout_s + 15,
                "model": {
                    "modelFormat": {"name": "triton", "version": "2"},
                    "runtime": KSERVE_RUNTIME,
                    "storageUri": storage,
                    "args": triton_args(service),
                    "env": _container_environment(service),
                    "resources": resources(service),
                    "volumeMounts": list(_POD_MOUNTS),
                    **probes(service, KSERVE_HTTP_PORT),
                },
                "volumes": _pod_volumes(service),
            }
        },
    }


# --- The Kustomize tree -----------------------------------------------------------------------------------


def _json_patch(operations: Sequence[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return {"target": {"kind": kind, "name": name}, "patch": json.dumps(list(operations))}


def _repository_patch(
    service: Service, argument: str, volume: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    container = "/spec/template/spec/containers/0"
    operations: list[dict[str, Any]] = [{"op": "add", "path": f"{container}/args/-", "value": argument}]
    if volume is not None:
        operations += [
            {
                "op": "add",
                "path": "/spec/template/spec/volumes/-",
                "value": {"name": "model-repository", **volume},
            },
            {
                "op": "add",
                "path": f"{container}/volumeMounts/-",
                "value": {
                    "name": "model-repository",
                    "mountPath": service.options.mount_path,
                    "readOnly": True,
                },
            },
        ]
    return operations


@dataclass(frozen=True)
class ManifestTree:
    """Files of the tree by path, each a dict (YAML), or a file copied as it is."""

    documents: dict[str, dict[str, Any]]
    copies: dict[str, Path]


def manifest_tree(repository: Path, options: KubernetesOptions = KubernetesOptions()) -> ManifestTree:
    needs = RepositoryNeeds.read(repository)
    service = Service(options, needs)
    base_files = {
        "deployment.yaml": deployment(service),
        "service.yaml": services(service)[0],
        "service-replicas.yaml": services(service)[1],
        "hpa.yaml": horizontal_pod_autoscaler(service),
        "servicemonitor.yaml": service_monitor(service),
        "prometheusrule.yaml": prometheus_rule(service),
    }
    # The dashboard's label is what Grafana's dashboard sidecar (kube-prometheus-stack) looks for.
    probe_map = (service.probe_config_map, service.labels)
    dashboard_map = (f"{service.name}-grafana-dashboard", {**service.labels, "grafana_dashboard": "1"})
    documents = {f"base/{path}": doc for path, doc in base_files.items()}
    documents["base/kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(base_files),
        "configMapGenerator": [
            {
                "name": name,
                "files": [file],
                "options": {"disableNameSuffixHash": True, "labels": dict(labels)},
            }
            for (name, labels), file in ((probe_map, PROBE_FILE), (dashboard_map, DASHBOARD_FILE))
        ],
    }
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    pvc_volume = {"persistentVolumeClaim": {"claimName": service.claim, "readOnly": True}}
    documents["overlays/pvc/pvc.yaml"] = persistent_volume_claim(service)
    documents["overlays/pvc/kustomization.yaml"] = {
        **overlay,
        "resources": ["../../base", "pvc.yaml"],
        "patches": [
            _json_patch(
                _repository_patch(service, f"--model-repository={options.mount_path}", pvc_volume),
                "Deployment",
                service.name,
            )
        ],
    }
    s3_operations = _repository_patch(service, f"--model-repository={_s3_url(service)}", None)
    # Credentials and region (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) from a Secret;
    # optional, for clusters that grant access to the pod's service account instead.
    s3_operations.append(
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/envFrom",
            "value": [{"secretRef": {"name": service.s3_secret, "optional": True}}],
        }
    )
    documents["overlays/s3/kustomization.yaml"] = {
        **overlay,
        "resources": ["../../base"],
        "patches": [_json_patch(s3_operations, "Deployment", service.name)],
    }
    documents["overlays/keda/scaledobject.yaml"] = scaled_object(service)
    documents["overlays/keda/delete-hpa.yaml"] = {
        "$patch": "delete",
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": service.name},
    }
    documents["overlays/keda/kustomization.yaml"] = {
        **overlay,
        "resources": ["../pvc", "scaledobject.yaml"],
        "patches": [{"path": "delete-hpa.yaml"}],
    }
    documents["kserve/inferenceservice.yaml"] = inference_service(service)
    documents["kserve/kustomization.yaml"] = {
        **overlay,
        "resources": ["inferenceservice.yaml"],
        "configMapGenerator": [
            {
                "name": service.probe_config_map,
                "files": [PROBE_FILE],
                "options": {"disableNameSuffixHash": True, "labels": service.labels},
            }
        ],
    }
    documents["prometheus-adapter-values.yaml"] = prometheus_adapter_values(service)
    copies = {
        f"base/{PROBE_FILE}": PROBE_SOURCE,
        f"kserve/{PROBE_FILE}": PROBE_SOURCE,
        f"base/{DASHBOARD_FILE}": MONITORING / "grafana_dashboard.json",
    }
    return ManifestTree(documents, copies)


def write_kubernetes(
    repository: Path, out: Path, options: KubernetesOptions = KubernetesOptions()
) -> list[Path]:
    """Writes the tree (module docstring) into ``out``, replacing what an earlier run wrote; returns the
    files."""
    import yaml

    tree = manifest_tree(repository, options)
    out = Path(out)
    for folder in ("base", "overlays", "kserve"):
        shutil.rmtree(out / folder, ignore_errors=True)
    written = []
    for relative, document in tree.documents.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
        written.append(path)
    for relative, source in tree.copies.items():
        shutil.copyfile(source, out / relative)
        written.append(out / relative)
    return sorted(written)

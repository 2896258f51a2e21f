"""`cluster k8s`: a KubeRay RayJob manifest (ray.io/v1) that runs a recipe on Kubernetes.

Two documents: a ConfigMap holding the recipe, and the RayJob. KubeRay creates a Ray cluster
(a CPU head group and one GPU worker group), runs `difftrain-dist train` as the job's entrypoint,
and deletes the cluster when the job ends (`shutdownAfterJobFinishes`). A failed job is retried
`backoffLimit` times on a fresh cluster; checkpoints and LoRA files live on a shared
PersistentVolumeClaim mounted on every pod, so each retry resumes the same run. Secrets come from
an existing Kubernetes Secret (`envFrom`), never from the manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import yaml

from difftrain_dist.config import Recipe

RECIPE_MOUNT = "/etc/difftrain"
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class K8sOptions:
    """The RayJob's shape; sizes in Kubernetes units."""

    image: str
    """Container image with difftrain-dist, its dependencies and CUDA."""
    workers: int
    """Pods in the GPU worker group."""
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    memory_per_worker: str = "64Gi"
    storage_claim: str = "difftrain-storage"
    """PersistentVolumeClaim (ReadWriteMany) mounted on every pod for checkpoints and outputs."""
    storage_mount: str = "/storage"
    secret: str | None = None
    """Existing Secret whose keys become environment variables (HF_TOKEN, …)."""
    namespace: str = "default"
    backoff_limit: int = 3
    """Retries of a failed job, each on a new Ray cluster that resumes from the checkpoints."""
    ttl_seconds_after_finished: int = 600

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker < 1 or self.backoff_limit < 0:
            raise ValueError("--workers and --cpus-per-worker must be >= 1, --gpus-per-worker and --retries >= 0")
        for flag, value in (("--storage-claim", self.storage_claim), ("--secret", self.secret),
                            ("--namespace", self.namespace)):
            if value is not None and not _DNS_NAME.match(value):
                raise ValueError(f"{flag}: {value!r} is not a Kubernetes name (lower-case letters, digits, '-')")
        if not self.storage_mount.startswith("/"):
            raise ValueError(f"--storage-mount: {self.storage_mount!r} must be an absolute path")


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-objects (the pods' mounts and volumes) out in full, without &anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def k8s_name(run_name: str) -> str:
    """A DNS-1123 name for Kubernetes objects from a run name (`My_Run.v2` → `my-run-v2`)."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:50].strip("-")
    return name or "difftrain"


def rayjob_manifest(recipe: Recipe, options: K8sOptions) -> str:
    """The ConfigMap + RayJob YAML for `recipe`.

    The recipe's `run.storage_path` and `run.output_dir` are moved onto the shared volume
    (`<storage_mount>/runs`, `<storage_mount>/outputs`); `distributed.num_workers` becomes
    workers × gpus_per_worker (one training worker per GPU). Model and shard paths are kept as
    given: they must be valid inside the pods (the volume, or hub ids).
    """
    name = k8s_name(recipe.run.name)
    return yaml.dump_all([_config_map(recipe, options, name), _rayjob(options, name)], Dumper=_PlainDumper,
                         sort_keys=False)


def _config_map(recipe: Recipe, o: K8sOptions, name: str) -> dict[str, Any]:
    """The ConfigMap holding the recipe as the pods see it (paths on the volume, one worker per GPU)."""
    raw = recipe.model_dump(mode="json")
    raw["run"]["storage_path"] = f"{o.storage_mount}/runs"
    raw["run"]["output_dir"] = f"{o.storage_mount}/outputs"
    raw["distributed"].update(
        num_workers=o.workers * max(o.gpus_per_worker, 1),
        use_gpu=o.gpus_per_worker > 0,
        cpus_per_worker=max(1, o.cpus_per_worker // max(o.gpus_per_worker, 1) - 1),
        address=None,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-recipe", "namespace": o.namespace, "labels": {"app": "difftrain-dist"}},
        "data": {"recipe.yaml": yaml.safe_dump(raw, sort_keys=False)},
    }


def _pod(o: K8sOptions, name: str, container: str, resources: dict[str, str]) -> dict[str, Any]:
    """A Ray pod template: the image, its resources, the shared volume and the recipe mounted."""
    volumes = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": o.storage_claim}},
        {"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
    ]
    spec: dict[str, Any] = {
        "name": container,
        "image": o.image,
        "resources": {"limits": resources, "requests": resources},
        "volumeMounts": [{"name": "storage", "mountPath": o.storage_mount},
                         {"name": "recipe", "mountPath": RECIPE_MOUNT, "readOnly": True}],
    }
    if o.secret:
        spec["envFrom"] = [{"secretRef": {"name": o.secret}}]
    return {"spec": {"containers": [spec], "volumes": volumes}}


def _rayjob(o: K8sOptions, name: str) -> dict[str, Any]:
    """The RayJob: a head without GPUs and one fixed-size worker group running `train`."""
    gpu = o.gpus_per_worker > 0
    worker_resources = {"cpu": str(o.cpus_per_worker), "memory": o.memory_per_worker}
    if gpu:
        worker_resources["nvidia.com/gpu"] = str(o.gpus_per_worker)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": o.namespace, "labels": {"app": "difftrain-dist"}},
        "spec": {
            "entrypoint": f"python -m difftrain_dist train {RECIPE_MOUNT}/recipe.yaml --no-progress",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": o.ttl_seconds_after_finished,
            "backoffLimit": o.backoff_limit,
            "rayClusterSpec": {
                "rayVersion": version("ray"),
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": _pod(o, name, "ray-head", {"cpu": "4", "memory": "16Gi"}),
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if gpu else "cpu-workers",
                    "replicas": o.workers,
                    "minReplicas": o.workers,
                    "maxReplicas": o.workers,
                    "rayStartParams": {},
                    "template": _pod(o, name, "ray-worker", worker_resources),
                }],
            },
        },
    }

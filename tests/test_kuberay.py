"""Dry-run check of the KubeRay manifests (no cluster is reachable here): they parse, match the
RayCluster/RayJob schema's required structure, use the Ray version we pin, mount the datastore
where the job's command reads it, and the job's command is a valid `ragseg` command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ragseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"

_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "image"],
            "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                           "resources": {"type": "object"}, "volumeMounts": {"type": "array"}}}},
        "volumes": {"type": "array"}}}}}
_GROUP_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
# The structure KubeRay's v1 CRDs require of these objects (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml)
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"},
    "headGroupSpec": {"type": "object", "required": ["template"],
                      "properties": {"rayStartParams": _GROUP_PARAMS, "template": _POD,
                                     "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}},
    "workerGroupSpecs": {"type": "array", "items": {
        "type": "object", "required": ["groupName", "template"],
        "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                       "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                       "rayStartParams": _GROUP_PARAMS, "template": _POD}}}}}
SCHEMAS = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": {
                   "type": "object", "required": ["entrypoint", "rayClusterSpec"],
                   "properties": {"entrypoint": {"type": "string"}, "rayClusterSpec": CLUSTER_SPEC,
                                  "shutdownAfterJobFinishes": {"type": "boolean"},
                                  "ttlSecondsAfterFinished": {"type": "integer"}}}}},
}


def _ray_pin() -> str:
    m = re.search(r"^ray==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert m, "requirements.txt pins ray"
    return m.group(1)


def _pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-label-all.yaml"])
def test_manifest_structure(name):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    jsonschema.validate(doc, SCHEMAS[doc["kind"]])
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == _ray_pin()
    images = set()
    for pod in _pods(spec):
        vols = {v["name"] for v in pod["spec"].get("volumes", [])}
        for c in pod["spec"]["containers"]:
            images.add(c["image"])
            assert {m["name"] for m in c.get("volumeMounts", [])} <= vols, f"{name}: mount of an undeclared volume"
            assert any(m["mountPath"] == "/data/datastore" for m in c["volumeMounts"]), "every pod sees the datastore"
    assert len(images) == 1, f"{name}: head and workers must run the same image: {images}"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_entrypoint_is_a_valid_command_that_fits_the_workers():
    doc = yaml.safe_load((KUBERAY / "rayjob-label-all.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "ragseg"
    a = build_parser().parse_args(argv[1:])  # argparse exits on an unknown flag
    assert a.func.__name__ == "cmd_label_all" and a.ray == "auto"
    assert a.target.startswith("/data/datastore")
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    limits = worker["resources"]["limits"]
    assert a.gpus_per_actor <= float(limits.get("nvidia.com/gpu", 0)), "an actor asks for more GPUs than a pod has"
    assert a.threads_per_actor <= float(limits["cpu"]), "an actor asks for more CPUs than a pod has"
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", "the head runs the driver only"


def test_dockerfile_uses_the_pinned_ray():
    text = (KUBERAY / "Dockerfile").read_text()
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-py311", text, re.M)
    assert m and m.group(1) == _ray_pin()

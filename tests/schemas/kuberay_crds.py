"""Makes tests/schemas/kuberay-vX.Y.Z.schema.json from KubeRay's own CRDs (ray-operator/config/crd/bases
at a release tag), for tests/test_cluster.py:

    python tests/schemas/kuberay_crds.py PATH/TO/kuberay.git v1.5.1 v1.6.2 v1.7.0

Each file holds the openAPIV3Schema of RayCluster's and RayJob's `spec`, as the API server checks it,
with two changes: every pod template is `$ref: #/$defs/PodTemplateSpec` (the test fills in Kubernetes'
own strict PodTemplateSpec schema), and every object with listed properties refuses others
(`additionalProperties: false`), since the API server would silently drop a misspelt field. CEL rules
(x-kubernetes-validations) are not checked."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def is_pod_template(node: dict) -> bool:
    spec = node.get("properties", {}).get("spec", {})
    return set(node.get("properties", {})) <= {"metadata", "spec"} and "containers" in spec.get("properties", {})


def convert(node):
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    if is_pod_template(node):
        return {"$ref": "#/$defs/PodTemplateSpec"}
    node = {key: convert(value) for key, value in node.items() if key != "description"}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


def schema(repo: str, tag: str) -> dict:
    defs = {"PodTemplateSpec": {"type": "object"}}
    for kind, name in CRDS.items():
        crd = yaml.safe_load(subprocess.run(["git", "-C", repo, "show", f"{tag}:ray-operator/config/crd/bases/{name}"],
                                            check=True, capture_output=True, text=True).stdout)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        defs[kind] = {
            "type": "object",
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object"},
                           "spec": convert(version["schema"]["openAPIV3Schema"]["properties"]["spec"])},
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
        }
    commit = subprocess.run(["git", "-C", repo, "rev-parse", f"{tag}^{{commit}}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"KubeRay {tag} (commit {commit}): ray-operator/config/crd/bases/"
                        f"{{{','.join(CRDS.values())}}}, made by tests/schemas/kuberay_crds.py "
                        "(pod templates by reference, unknown fields refused).",
            "$defs": defs, "oneOf": [{"$ref": f"#/$defs/{kind}"} for kind in CRDS]}


if __name__ == "__main__":
    repo, *tags = sys.argv[1:]
    for tag in tags:
        out = Path(__file__).parent / f"kuberay-{tag}.schema.json"
        out.write_text(json.dumps(schema(repo, tag), indent=1, sort_keys=True) + "\n")
        print(out, out.stat().st_size)

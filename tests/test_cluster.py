"""cluster/: the rehearsal of `make cluster-demo` run for real on the production stack (a Ray head and a
worker node with token authentication; an MLflow server with basic auth, its backend store in
PostgreSQL, its artifacts in SeaweedFS's S3 server; the search's storage in the same bucket; the search
submitted with `ray job submit`), then every manifest checked against the schema of what will read it."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from aesearch.training.checkpoints import load_checkpoint
from tests.conftest import REPO
from tests.searching import search_command, write_space

sys.path.insert(0, str(REPO / "cluster"))
from rehearsal import LocalCluster, rehearse  # noqa: E402

CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).parent / "schemas"
CANARY = "AESEARCH_TEST_CANARY"
# The rehearsal's trials: 2 at a time, one on each node (1 CPU each), so both nodes train one in the same
# wave. budget.keep_checkpoints: the best trial keeps its checkpoint, the other's is removed through the server.
TRIALS, KEPT = 2, 1

# --- the rehearsal ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, ray_instance):
    """`make cluster-demo` on a smaller search: (cluster, summary, pids it started). The cluster stays up
    for this module's tests; stopping it must end every process it started (checked at teardown)."""
    # As on a machine where the demo's cluster is the only Ray: the job's driver takes any Ray instance it
    # finds running here for the cluster it was submitted to.
    ray_instance.stop()
    folder = tmp_path_factory.mktemp("cluster-demo")
    space = write_space(folder, "cluster-demo", trials=TRIALS, epochs=2, grace=2, keep=KEPT)
    os.environ[CANARY] = secrets.token_hex(16)  # an environment variable every node and trial inherits
    with LocalCluster(folder / "work", workers=1) as cluster:
        pids = [service.process.pid for service in cluster.processes()]
        groups = {os.getpgid(pid) for pid in pids}
        assert len(groups) == 4  # PostgreSQL, the S3 server, MLflow's server, the Ray nodes: a group each
        summary = rehearse(cluster, space, "cluster-demo", folder / "report", [])
        yield cluster, summary, pids
    os.environ.pop(CANARY)
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # nothing of what it started is left
    assert not cluster.ray_temp.exists() and not cluster.database.data.exists()


@pytest.fixture
def as_mlflow_admin(rehearsal, monkeypatch):
    """This test process as one of the cluster's clients: the MLflow credentials in its environment."""
    cluster = rehearsal[0]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", cluster.mlflow_password)
    return MlflowClient(cluster.tracking_uri)


def bucket_keys(cluster: LocalCluster, prefix: str) -> list[str]:
    pages = cluster.s3.client().get_paginator("list_objects_v2").paginate(Bucket=cluster.s3.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def bucket_object(cluster: LocalCluster, key: str):
    return cluster.s3.client().get_object(Bucket=cluster.s3.bucket, Key=key)["Body"]


def job_log(summary: dict) -> str:
    logs = Path(summary["logs"])
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))


def test_the_submitted_search_ran_its_trials_on_both_nodes_and_logged_everything_to_the_server(
    rehearsal, as_mlflow_admin, tmp_path
):
    cluster, summary, _ = rehearsal
    assert summary["job_exit_status"] == 0, job_log(summary)
    client = as_mlflow_admin
    experiment = client.get_experiment_by_name("cluster-demo")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied: no client writes the store
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'",
                                run_view_type=ViewType.ALL)
    assert len(trials) == TRIALS and {run.info.status for run in trials} == {"FINISHED"}
    assert len({run.data.tags["node"] for run in trials}) == 2  # the head and the worker both trained trials

    ranked = sorted(trials, key=lambda run: run.data.metrics["val/recon_mse"])
    assert summary["artifact_store"] == "s3://aesearch/mlflow" and summary["backend_store"].startswith("postgresql://")
    artifacts = bucket_keys(cluster, "mlflow/")
    for rank, run in enumerate(ranked, 1):  # each epoch once, the pictures and checkpoints through the server
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/recon_mse")] == [1, 2]
        picture = client.download_artifacts(run.info.run_id, "images/reconstructions.png", str(tmp_path))
        assert matplotlib.image.imread(picture).ndim == 3
        # Every trial's files are in the server's artifact store, the bucket...
        stored = {key.rsplit("/", 1)[1] for key in artifacts if f"/{run.info.run_id}/" in key}
        assert {"config.yaml", "reconstructions.png"} <= stored, stored
        if rank <= KEPT:  # ... the best trials' checkpoints too; the others' were removed through the server
            checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path))
            assert load_checkpoint(checkpoint)["config"]["data"]["name"] == "digits"
        else:
            assert "best.pt" not in stored and run.data.tags["checkpoints"].startswith("removed")
    assert client.search_model_versions("name='cluster-demo'")  # the best model, registered
    assert "could not remove the checkpoints" not in Path(summary["logs"], "job.log").read_text()

    # Nothing is in the folder the job was submitted from, nor where the servers run.
    assert list(Path(summary["submitted_from"]).iterdir()) == []
    assert {p.name for p in cluster.workdir.iterdir()} == {"secrets", "postgres", "s3", "logs", "submit"}
    # The search's storage, in the same bucket, holds Ray Tune's results and the search's own files.
    assert summary["storage"] == "s3://aesearch/searches"
    search = bucket_keys(cluster, "searches/cluster-demo/")
    assert {"leaderboard.csv", "tracking_uri", "space.yaml"} <= {key.rsplit("/", 1)[1] for key in search}
    assert len(pd.read_csv(bucket_object(cluster, "searches/cluster-demo/leaderboard.csv"))) == TRIALS
    assert bucket_object(cluster, "searches/cluster-demo/tracking_uri").read().decode().strip() == cluster.tracking_uri
    assert any("/checkpoint_" in key for key in search)  # trial checkpoints went to the bucket too


def test_the_report_was_built_from_the_server(rehearsal, as_mlflow_admin):
    _, summary, _ = rehearsal
    assert summary["report_exit_status"] == 0, job_log(summary)
    board = pd.read_csv(Path(summary["report"]) / "leaderboard.csv")
    client = as_mlflow_admin
    experiment = client.get_experiment_by_name("cluster-demo")
    best = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'",
                              order_by=["metrics.`val/recon_mse` ASC"], max_results=1)[0]
    assert board.loc[board["rank"] == 1, "run_id"].item() == best.info.run_id
    assert board["reproduce"][0].endswith(f"--tracking-uri {rehearsal[0].tracking_uri}")
    pictures = list((Path(summary["report"]) / "images").glob("*-reconstructions.png"))
    assert len(pictures) == TRIALS  # every trial's, downloaded through the server


def test_the_best_trial_reproduces_on_this_machine_from_the_server(rehearsal, as_mlflow_admin, tmp_path, capsys,
                                                                 monkeypatch):
    from aesearch.cli import main

    cluster = rehearsal[0]
    monkeypatch.chdir(tmp_path)
    default_store = os.environ.get("MLFLOW_TRACKING_URI")
    assert main(["reproduce", "cluster-demo", "--tracking-uri", cluster.tracking_uri, "--from-checkpoint"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reproduced"]
    assert os.environ.get("MLFLOW_TRACKING_URI") == default_store  # not left pointing at the server


def test_a_driver_without_the_token_is_refused_in_one_line(rehearsal, tmp_path, capsys, monkeypatch):
    cluster = rehearsal[0]
    space = write_space(tmp_path, "intruder", trials=2, epochs=1, grace=1)
    env = {**cluster.env(ray_token=False), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}  # a wrong token
    started = time.monotonic()
    done = subprocess.run(search_command(space, tmp_path / "results", "--address", cluster.gcs_address),
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert time.monotonic() - started < 25  # seconds (imports included), not Ray's 20 retries of a refusal
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"aesearch: error: --address {cluster.gcs_address}: cannot connect to the Ray cluster")
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written
    assert "0" * 64 not in done.stderr


def test_a_job_without_the_ray_token_or_with_a_wrong_one_is_refused(rehearsal, tmp_path):
    cluster = rehearsal[0]
    refused = cluster.submit(["echo", "should-not-run"], tmp_path, ray_token=False)
    assert refused.returncode != 0 and "should-not-run" not in refused.stdout
    assert re.search(r"(?i)unauthori[sz]ed|authentication|token", refused.stdout + refused.stderr)

    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):  # the Jobs REST API itself
        request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", method="POST", headers=headers,
                                         data=json.dumps({"entrypoint": "echo should-not-run"}).encode())
        request.add_header("Content-Type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code in (401, 403)
    listed = urllib.request.urlopen(urllib.request.Request(f"{cluster.dashboard}/api/jobs/",
                                                           headers=cluster.ray_headers()), timeout=10)
    assert all("should-not-run" not in job["entrypoint"] for job in json.load(listed))


def test_the_tracking_server_refuses_a_client_without_the_password(rehearsal):
    cluster = rehearsal[0]
    url = f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cluster-demo"
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(url, timeout=10)
    assert answer.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(url, headers=cluster.mlflow_headers()), timeout=10) as ok:
        assert json.load(ok)["experiment"]["name"] == "cluster-demo"


def test_no_secret_reaches_a_log_a_param_a_tag_an_artifact_or_a_command_line(rehearsal, as_mlflow_admin):
    cluster, summary, pids = rehearsal
    hidden = [*cluster.secret_values(), os.environ[CANARY]]
    assert len(hidden) == 9
    for log in cluster.workdir.rglob("*.log"):  # the job's, the servers' and the nodes' logs
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in hidden), log
    for pid in pids:  # the processes it started: their command lines are visible to every user
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(secret in command_line for secret in hidden)
    client = as_mlflow_admin
    experiment = client.get_experiment_by_name("cluster-demo")
    for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
        recorded = json.dumps({**run.data.params, **run.data.tags})
        assert not any(secret in recorded for secret in hidden), run.info.run_id
    stored = bucket_keys(cluster, "")
    assert len(stored) > 20
    for key in stored:  # MLflow's configs, spaces, leaderboard, checkpoints, pictures; Ray Tune's results, state
        content = bucket_object(cluster, key).read()
        assert not any(secret.encode() in content for secret in hidden), key
    for report in Path(summary["report"]).rglob("*"):
        assert report.is_dir() or not any(secret.encode() in report.read_bytes() for secret in hidden), report
    assert (cluster.secrets / "ray_token").stat().st_mode & 0o077 == 0  # the owner's alone


# --- the manifests --------------------------------------------------------------------------------


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_file_in_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert documents(path), path


KUBERNETES = "1.33"  # the Kubernetes version whose strict schemas the manifests are held to


def kubernetes_schemas():
    """Kubernetes' strict schemas (kubernetes-validate): a registry, and PodTemplateSpec's id in it."""
    from kubernetes_validate.utils import latest_version, schema_contents
    from referencing import Registry, Resource

    assert latest_version() >= KUBERNETES
    folder = f"kubernetes-json-schema/v{KUBERNETES}.0-local-strict"
    pod_template = schema_contents(f"{folder}/podtemplatespec-v1.json", KUBERNETES)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES)
    registry = Resource.from_contents(pod_template) @ (Resource.from_contents(definitions) @ Registry())
    return registry, pod_template["$id"]


def kuberay_validator():
    from jsonschema import Draft202012Validator

    registry, pod_template = kubernetes_schemas()
    schema = json.loads((SCHEMAS / "kuberay-v1.schema.json").read_text())
    schema["$defs"]["PodTemplateSpec"] = {"$ref": pod_template}
    return Draft202012Validator(schema, registry=registry)


def errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]


def test_the_kuberay_manifests_use_only_fields_of_kuberays_api():
    validator = kuberay_validator()
    kinds = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for document in documents(path):
            assert errors(validator, document) == [], path
            kinds.append(document["kind"])
    assert sorted(kinds) == ["RayCluster", "RayJob"]

    # The check has teeth: a misspelt field, a number where Ray expects a string, a bad pod field.
    cluster = documents(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    group = cluster["spec"]["workerGroupSpecs"][0]
    for broken in ({**group, "minReplica": 0}, {**group, "rayStartParams": {"num-cpus": 0}},
                   {**group, "template": {"spec": {"containerz": []}}}):
        assert errors(validator, {**cluster, "spec": {**cluster["spec"], "workerGroupSpecs": [broken]}})


def test_the_ray_cluster_asks_for_gpus_autoscales_and_keeps_the_token_on_every_node():
    cluster = documents(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    job = documents(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["rayVersion"] == package_version_in_lock("ray")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["entrypoint"].startswith("aesearch search ") and "--storage s3://" in job["spec"]["entrypoint"]

    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0],
                  gpu["template"]["spec"]["containers"][0], spec["autoscalerOptions"],
                  job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "aesearch-ray-token", "key": "token"}


def test_the_mlflow_kubernetes_manifests_match_kubernetes_strict_schemas():
    import kubernetes_validate

    kinds = []
    for document in documents(CLUSTER / "mlflow" / "kubernetes.yaml"):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
        kinds.append(document["kind"])
    assert {"Deployment", "Service", "StatefulSet", "Job", "PersistentVolumeClaim"} <= set(kinds)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**documents(CLUSTER / "mlflow" / "kubernetes.yaml")[0], "spek": {}},
                                     KUBERNETES, strict=True)


def test_the_compose_file_matches_the_compose_specification():
    from jsonschema import Draft201909Validator

    validator = Draft201909Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))
    compose = documents(CLUSTER / "mlflow" / "compose.yaml")[0]
    assert errors(validator, compose) == []
    mlflow = compose["services"]["mlflow"]
    assert errors(validator, {**compose, "services": {**compose["services"], "mlflow": {**mlflow, "portz": []}}})
    assert all(port.startswith("127.0.0.1:") for service in compose["services"].values()
               for port in service.get("ports", []))  # nothing published beyond this machine
    assert "--app-name=basic-auth" in mlflow["command"]


def test_the_tracking_servers_keep_passwords_out_of_their_command_lines():
    compose = documents(CLUSTER / "mlflow" / "compose.yaml")[0]["services"]["mlflow"]
    deployment = next(d for d in documents(CLUSTER / "mlflow" / "kubernetes.yaml")
                      if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for command in (compose["command"], container["args"]):
        assert not any("postgresql://" in part or "password" in part.lower() for part in command)
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]


def test_the_launcher_config_passes_rays_validation_and_uses_ec2_parameters():
    import botocore.session
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(CLUSTER / "launcher" / "aws.yaml")[0]
    validate_config(prepare_config(config))  # as `ray up` does: merged with the AWS defaults, then checked
    with pytest.raises(ValidationError):
        validate_config(prepare_config({**config, "max_worker": 8}))

    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    parameters = set(run_instances.input_shape.members)
    gpu_types = []
    for name, node_type in config["available_node_types"].items():
        assert set(node_type["node_config"]) <= parameters, name
        if node_type.get("max_workers", 0) > 0:
            gpu_types.append(node_type["node_config"]["InstanceType"])
    assert gpu_types and all(t.split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"} for t in gpu_types)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start


def package_version_in_lock(name: str) -> str:
    found = re.search(rf'\[\[package\]\]\nname = "{name}"\nversion = "([^"]+)"', (REPO / "uv.lock").read_text())
    return found.group(1)


def test_the_image_installs_exactly_the_lock_file():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    steps = [" ".join(step.split()) for step in "\n".join(lines).replace("\\\n", " ").splitlines() if step.strip()]
    copy_lock = next(i for i, step in enumerate(steps) if step.startswith("COPY") and "uv.lock" in step)
    installs = [(i, step) for i, step in enumerate(steps) if step.startswith("RUN") and "uv " in step]
    assert installs and all(i > copy_lock for i, _ in installs)
    for _, step in installs:
        for sync in re.findall(r"uv sync[^&;]*", step):
            assert "--locked" in sync, sync
    assert "pip install" not in dockerfile and "uv pip" not in dockerfile and "uv add" not in dockerfile

    uv_image = re.search(r"ghcr.io/astral-sh/uv:([\d.]+)", dockerfile).group(1)
    makefile_uv = re.search(r"uv==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert uv_image == makefile_uv  # the uv that wrote and checks the lock here builds the image

    extras = set(re.findall(r"--extra (\w+)", dockerfile))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras and extras <= set(declared)

    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    for step in steps:
        if step.startswith("COPY") and "--from=" not in step:
            for source in step.split()[1:-1]:
                assert source.rstrip("/") in allowed, source

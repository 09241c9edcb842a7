"""The driver's side of tracking: the experiment, the search's parent run, every trial run's ending.

The driver owns the parent run and gives every child run its outcome and terminal status when
Tune is done with the trial, so no run is left "running" after a search.
"""

from __future__ import annotations

import platform
import subprocess
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aesearch.errors import UserError
from aesearch.tracking.model_registry import register_best_model, start_export_warmup
from aesearch.tracking.outcomes import Outcome
from aesearch.tracking.runs import ROLE_TAG, TRIAL_ID_TAG, as_param, close_run, dataset_input
from aesearch.tracking.store import Tracking, client, embedded_artifacts, is_local_store, misplaced_artifacts_note
from aesearch.training.checkpoints import BEST_CHECKPOINT

if TYPE_CHECKING:
    from aesearch.parts.data import Data

RUN_REQUESTS = 8  # requests for as many runs sent to a tracking server at once, at the end of a search


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("aesearch", "torch", "torchvision", "ray", "optuna", "mlflow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def git_commit() -> str:
    """The commit of the code that ran ("unknown" outside a git checkout; "+dirty" if edited)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class SearchRun:
    """The driver's side: the experiment, the parent run, and every trial run's ending."""

    def __init__(self, uri: str, name: str = "", tracking: Tracking | None = None):
        self.uri, self.name, self.client = uri, name, client(uri)
        self.tracking = tracking  # set by `start`
        self.export_warmup: threading.Thread | None = None

    def prepare_model_export(self) -> None:
        """Warm up, in the background while the trials run, what `register_best` needs."""
        self.export_warmup = start_export_warmup()

    def check_new(self) -> None:
        """Refuse a second search of the same name in one tracking store (before anything starts)."""
        from mlflow.exceptions import MlflowException

        try:
            experiment = self.client.get_experiment_by_name(self.name)
        except MlflowException as error:  # e.g. a server that refuses our credentials
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise UserError(f"--tracking-uri {self.uri}: the tracking store refused us: {first}") from None
        if experiment is not None and self.client.search_runs([experiment.experiment_id], max_results=1):
            raise UserError(
                f"--name {self.name}: the tracking store {self.uri} already holds an experiment of that name "
                "with runs; pick another --name, or --resume that search"
            )

    def check_artifacts_in_place(self) -> None:
        """Refuse to resume a search whose artifacts an earlier aesearch misplaced: its new trials would
        add to the misplaced folder, or fail to write there (for anyone not root)."""
        experiment = self.client.get_experiment_by_name(self.name)
        note = None if experiment is None else misplaced_artifacts_note(experiment)
        if note is not None:
            raise UserError(f"--resume: {note}, before resuming it")

    def start(self, resume: bool, describe: dict[str, Any], space_yaml: str, patience_s: float,
              data: Data | None = None, batch_s: float = 0.0) -> Tracking:
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            location = embedded_artifacts(self.uri, self.name)
            experiment_id = self.client.create_experiment(self.name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        # MLflow's UI opens an experiment of this kind on its training runs (not GenAI traces).
        self.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        parents = self.client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'", max_results=1)
        if resume and parents:
            run_id = parents[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=self.name, tags={ROLE_TAG: "search", **describe["tags"]})
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, as_param(v)) for k, v in describe["params"].items()]
            self.client.log_batch(run_id, params=params, synchronous=True)
            self.client.log_text(run_id, space_yaml, "space.yaml")
            if data is not None:
                self.client.log_inputs(run_id, [dataset_input(data, "search")])
        self.tracking = Tracking(self.uri, experiment_id, run_id, patience_s, batch_s)
        return self.tracking

    def trial_runs(self, running_only: bool = False, trial_id: str | None = None) -> dict[str, Any]:
        """Ray trial id -> its MLflow run, for every trial run of this search (`running_only`: those
        still RUNNING; `trial_id`: that trial's only). Listing runs reads them whole: ~3-5 ms per run on
        the embedded store."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        wanted = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.tracking.parent_run_id}'"
        if running_only:
            wanted += " and attributes.status = 'RUNNING'"
        if trial_id is not None:
            wanted += f" and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
        found, token = {}, None
        while True:
            page = self.client.search_runs([self.tracking.experiment_id], filter_string=wanted,
                                           max_results=1000, page_token=token)
            found |= {run.data.tags.get(TRIAL_ID_TAG): run for run in page}
            token = page.token
            if not token:
                return found

    def close_trial(self, trial_id: str, outcome: Outcome, run_id: str | None = None, epochs: int = 0,
                    undelivered: str | None = None) -> None:
        """Give a trial's run its outcome and a terminal status (FINISHED, or FAILED if it errored), and
        say so on the run (tag `tracking`) if records of its `epochs` never reached the server.
        `undelivered`: what the trial itself said did not reach the server ('' nothing: every record
        did); None where it could not say (stopped, errored): the run's epochs are then read to see."""
        if run_id is None:  # it errored before its first report
            run = self.trial_runs(trial_id=trial_id).get(trial_id)
            if run is None:  # ... or before it could open its run
                return
            run_id = run.info.run_id
        missing = []
        if undelivered is None:
            logged = {m.step for m in self.client.get_metric_history(run_id, "epoch")}
            missing = sorted(set(range(1, epochs + 1)) - logged)
        gaps = [undelivered] if undelivered else []
        if missing:
            gaps.append(f"no metrics for epoch(s) {', '.join(map(str, missing))}")
        close_run(self.client, run_id, outcome, gaps)

    def log_errors(self, run_id: str, tracebacks: str, attempts: int) -> None:
        """What a failed trial raised, each failed attempt's traceback (Tune's error file), as an artifact."""
        self.client.log_text(run_id, tracebacks, "errors/tracebacks.txt")
        self.client.set_tag(run_id, "failed_attempts", str(attempts))

    def log_best_checkpoint(self, run_id: str, checkpoint: Any) -> None:
        """For a trial ASHA stopped between epochs: its best checkpoint, from its last Tune checkpoint."""
        with checkpoint.as_directory() as folder:
            best = Path(folder) / Path(BEST_CHECKPOINT).name
            if best.is_file():
                self.client.log_artifact(run_id, str(best), Path(BEST_CHECKPOINT).parent.as_posix())

    def remove_checkpoints(self, run_id: str, artifact_uri: str | None = None) -> None:
        """A trial's checkpoints leave its run (once it is out of the search's best K). Given where the
        run's artifacts are (its trial reported it), nothing is read first: deleting a folder that is
        not there deletes nothing, in each of MLflow's artifact stores."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # With the store's URI: an `mlflow-artifacts:` location is reached through that server.
        repository = get_artifact_repository(artifact_uri or self.client.get_run(run_id).info.artifact_uri,
                                             tracking_uri=self.uri)
        repository.delete_artifacts(Path(BEST_CHECKPOINT).parent.as_posix())
        self.client.set_tag(run_id, "checkpoints", "removed: not among the search's best budget.keep_checkpoints")

    def finish(self, status: str, leaderboard_csv: str | None = None, trial_ids: set[str] | None = None) -> None:
        """End the search run with `status`. Trial runs Tune left unfinished become KILLED. Given the
        `trial_ids` Tune knows (a resumed search), runs of other trials (started after a killed driver
        last saved its state, and so sampled afresh by the resumed search) are closed and deleted (soft:
        MLflow can restore them); without them only the runs still RUNNING are listed."""
        lost = Outcome("lost", detail="the search state was saved before this trial began")

        def close(trial_id_and_run: tuple[str, Any]) -> None:
            trial_id, run = trial_id_and_run
            if trial_ids is not None and trial_id not in trial_ids:
                close_run(self.client, run.info.run_id, lost, status="KILLED")
                self.client.delete_run(run.info.run_id)
            elif run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")

        self.for_each_run(close, self.trial_runs(running_only=trial_ids is None).items())
        if leaderboard_csv is not None:
            self.client.log_text(self.tracking.parent_run_id, leaderboard_csv, "leaderboard.csv")
        self.client.set_terminated(self.tracking.parent_run_id, status=status)

    def tag_ranks(self, ranks: dict[str, dict[str, str]]) -> None:
        """Each trial run's place in the search, as tags (MLflow run id -> {tag: value}): `rank`, and
        with several objectives `pareto_rank` and `pareto_front` (true/false), so that the UI can filter
        and sort on them."""
        from mlflow.entities import RunTag

        def tag(run_id: str) -> None:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in ranks[run_id].items()], synchronous=True)

        self.for_each_run(tag, ranks)

    def for_each_run(self, write: Callable[[Any], None], runs: Iterable[Any]) -> None:
        """`write` for each of many runs (MLflow has no call for many runs at once): a tracking server
        answers RUN_REQUESTS at once; the embedded store writes one at a time whoever asks (threads
        gained nothing there: 7.7 -> 6.1 ms a run at 4)."""
        with ThreadPoolExecutor(1 if is_local_store(self.uri) else RUN_REQUESTS) as requests:
            list(requests.map(write, runs))

    def register_best(self, run_id: str, metrics: dict[str, float], front: list[str] | None = None) -> str | None:
        """Log the best trial's model (its MLflow run `run_id`) under the search run, register it as
        `<search name>` with the alias `champion`; `front` (several objectives): the trial ids on the
        Pareto front, tagged on it."""
        run = self.client.get_run(run_id)
        if self.export_warmup is not None:  # one torch.export at a time
            self.export_warmup.join()
        return register_best_model(self.client, self.uri, self.tracking.parent_run_id, self.name, run, metrics, front)

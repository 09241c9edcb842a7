"""MLflow tracking: one experiment per search, a parent run for the search, one child run per trial.

    experiment <search name>              tagged so the UI opens on its training runs
      run <search name>                   space.yaml, seed, dataset fingerprint, versions, git commit,
                                          cluster size, leaderboard.csv, the best model (registered)
        run beta_vae-dense-z16-b2-#17     one per Tune trial: the resolved config as params, tags,
                                          per-epoch metrics (step = epoch), test/... metrics,
                                          images/, config.yaml, checkpoints/best.pt

A trial logs its own run from inside the trial (`TrialRun`), the only thing that writes it; a
trial restored from a checkpoint finds its run again by its Ray trial id and goes on in it. The
driver (`search_run.SearchRun`) owns the parent run. A trial whose outcome is its own (it completed
or diverged) closes its run itself; the driver gives every other child run its outcome and terminal
status when Tune is done with the trial, so no run is left "running" after a search.
This module holds the trial's side and the names and tags every run shares; where the store is,
see `store`.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from aesearch.config import TrainConfig, variant_family
from aesearch.parts.data import IMAGE
from aesearch.schema import flatten
from aesearch.tracking.outbox import Outbox, patiently
from aesearch.tracking.outcomes import Outcome
from aesearch.tracking.store import MLFLOW_BATCH, Tracking, client
from aesearch.training.checkpoints import BEST_CHECKPOINT

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from aesearch.parts.data import Data
    from aesearch.training.trainer import EpochEnd, TrainResult

TRIAL_ID_TAG = "aesearch.trial_id"
TRIAL_NUMBER_TAG = "aesearch.trial_number"  # the trial's ordinal in its search, from 1
ROLE_TAG = "aesearch.role"  # "search" (the parent run), "trial" or "reproduction"
REPRODUCES_TAG = "aesearch.reproduces"  # a reproduction's original run
ATTEMPT_TAG = "aesearch.attempt"  # 1 for a trial's first run, +1 for each retry or resume
INCOMPLETE_TAG = "tracking"  # set when records of the run never reached the server


# --- names and tags ---------------------------------------------------------------------------


def run_name(config: TrainConfig, number: str) -> str:
    """Readable and unique within a search: `beta_vae-dense-z16-b2-#17`, `denoising-conv-z8-gaussian0.3-#4`."""
    family, architecture = variant_family(config), config.model.architecture
    parts = [family] if family == architecture else [family, architecture]
    parts.append(f"z{config.model.latent_dim}")
    if config.model.latent == "gaussian":
        parts.append(f"b{config.objective.kl.beta:.3g}")
    if config.corruption.kind != "none":
        parts.append(f"{config.corruption.kind}{config.corruption.level:.3g}")
    return "-".join(parts) + f"-#{number}"


def objective_summary(config: TrainConfig) -> str:
    """The loss as a formula of named terms, e.g. `mse + 2*kl(linear)` or `bce + 0.001*sparsity_kl`."""
    objective = config.objective
    terms = [objective.reconstruction]
    if config.model.latent == "gaussian":
        terms.append(f"{objective.kl.beta:g}*kl({objective.kl.schedule})")
    if objective.sparsity.kind != "none":
        terms.append(f"{objective.sparsity.weight:g}*sparsity_{objective.sparsity.kind}")
    if objective.contractive_weight > 0:
        terms.append(f"{objective.contractive_weight:g}*contractive")
    return " + ".join(terms)


def trial_tags(config: TrainConfig) -> dict[str, str]:
    noise = config.corruption.kind
    return {
        "family": variant_family(config),
        "architecture": config.model.architecture,
        "latent": config.model.latent,
        "noise": noise if noise == "none" else f"{noise}:{config.corruption.level:g}",
        "objective": objective_summary(config),
        "dataset": config.data.dataset,
    }


def as_param(value: Any) -> str:
    return "null" if value is None else str(value)


# --- inside a trial ---------------------------------------------------------------------------


def image_epochs(epochs: int) -> set[int]:
    """A few epochs to draw reconstructions at during training (the end is drawn anyway)."""
    return {e for e in (1, math.ceil(epochs / 4), math.ceil(epochs / 2), math.ceil(3 * epochs / 4)) if e < epochs}


def find_trial_run(mlflow: MlflowClient, experiment_id: str, trial_id: str) -> Any:
    """The run a Ray trial already has (it is being retried or resumed), or None."""
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'", max_results=1)
    return found[0] if found else None


def training_tags(config: TrainConfig, data: Data) -> dict[str, str]:
    """What a reproduction must match: the dataset's fingerprint and how the arithmetic ran
    (on the CPU, the thread count changes the order of float sums, and so the results)."""
    from aesearch.config import resolve_device

    device = resolve_device(config.runtime.device)
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"dataset_fingerprint": data.fingerprint, "device": f"{device.type}:{described}",
            "torch_threads": str(torch.get_num_threads())}


def dataset_input(data: Data, context: str) -> Any:
    """The data as an MLflow dataset input: its source, digest (the fingerprint) and schema (the
    columns, or the image shape), so the UI shows which data every run saw."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    spec = data.spec
    if spec.columns:
        schema = {"mlflow_colspec": [{"name": c.name, "type": "double" if c.kind == "numeric" else "string"}
                                     for c in spec.columns]}
    else:
        schema = {"mlflow_tensorspec": {"features": json.dumps([{"type": "tensor", "tensor-spec": {
            "dtype": "float32", "shape": [-1, *spec.shape]}}])}}
    source = {"uri": spec.source} if spec.source else {"uri": f"aesearch:builtin/{spec.name}"}
    profile = {"train": len(data.train_x), "validation": len(data.val_x), "test": len(data.test_x),
               "description": spec.describe()}
    dataset = Dataset(name=spec.name, digest=data.fingerprint, source_type="local" if spec.source else "aesearch",
                      source=json.dumps(source), schema=json.dumps(schema), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def create_run(mlflow: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], config: TrainConfig) -> Any:
    """A new run holding the resolved config: as flattened params (the same names for every
    variant) and as `config.yaml`. Returns its `RunInfo`."""
    from mlflow.entities import Param

    info = mlflow.create_run(experiment_id, run_name=name, tags=tags).info
    run_id = info.run_id
    params = [Param(k, as_param(v)) for k, v in flatten(config.model_dump(mode="json")).items()]
    for start in range(0, len(params), MLFLOW_BATCH):
        mlflow.log_batch(run_id, params=params[start : start + MLFLOW_BATCH], synchronous=True)
    mlflow.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
    return info


def close_run(mlflow: MlflowClient, run_id: str, outcome: Outcome, gaps: list[str] | None = None,
              status: str | None = None) -> None:
    """A trial run's end, written one way by whoever closes it (the trial, or the driver where the trial
    could not): its outcome, and what never reached the server (`gaps`), as tags in one request, then its
    terminal status (by default FAILED if it errored, else FINISHED)."""
    from mlflow.entities import RunTag

    tags = outcome.tags() | ({INCOMPLETE_TAG: "incomplete: " + "; ".join(gaps)} if gaps else {})
    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    mlflow.set_terminated(run_id, status=status or ("FAILED" if outcome.kind == "errored" else "FINISHED"))


class TrialRun:
    """The MLflow run of one training: per-epoch metrics, images, the test suite, the best
    checkpoint. A search trial writes it from inside the trial (`for_trial`, which a restored
    trial continues); a local reproduction writes one the same way. Everything goes through an
    `Outbox`: a tracking server that stops answering delays the records, not the training."""

    def __init__(self, mlflow: MlflowClient, run_id: str, config: TrainConfig, data: Data, logged_through: int = 0,
                 attempt: int = 1, patience_s: float = 60.0, batch_s: float = 0.0, artifact_uri: str = ""):
        self.client, self.run_id, self.config, self.data = mlflow, run_id, config, data
        self.artifact_uri = artifact_uri  # where its artifacts are: the driver removes checkpoints there unread
        self.logged_through = logged_through  # epochs already in the run (a restored trial)
        self.attempt = attempt  # 1, then 2, 3... each time the trial is retried or resumed
        self.patience_s = patience_s  # how long `finish` waits for an unreachable server (a search: its budget's)
        self.batch_s = batch_s  # epochs' metrics wait up to this long, to go in one request (0: sent at once)
        self.waiting: list[Any] = []  # metrics not sent yet
        self.sent_at = time.monotonic()
        # reconstructions drawn during training: images only (a vector's figures come at the end)
        self.draw_at = image_epochs(config.epochs) if data.spec.modality == IMAGE else set()
        self.outbox = Outbox()
        self.direct_seconds = 0.0  # requests outside the outbox: opening the run, closing it

    @property
    def seconds(self) -> float:
        """Time spent on the tracking server (not drawing pictures): benchmarks/ reads it."""
        return self.direct_seconds + self.outbox.seconds

    @classmethod
    def for_trial(
        cls, tracking: Tracking, trial_id: str, number: str, config: TrainConfig, data: Data, node: str
    ) -> TrialRun:
        """The run of a Ray trial: found again by its trial id (a retry or a resumed search), else new.
        A trial that starts while the server does not answer waits for it (up to the patience)."""
        started = time.perf_counter()
        run = patiently(lambda: cls._open(tracking, trial_id, number, config, data, node), tracking.patience_s)
        run.direct_seconds = time.perf_counter() - started
        return run

    @classmethod
    def _open(cls, tracking: Tracking, trial_id: str, number: str, config: TrainConfig, data: Data, node: str) -> TrialRun:
        mlflow = client(tracking.uri)
        tags = {"node": node, **training_tags(config, data)}
        existing = find_trial_run(mlflow, tracking.experiment_id, trial_id)
        if existing is None:
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            tags |= {MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id,
                     TRIAL_NUMBER_TAG: number, ATTEMPT_TAG: "1", **trial_tags(config)}
            info = create_run(mlflow, tracking.experiment_id, run_name(config, number), tags, config)
            mlflow.log_inputs(info.run_id, [dataset_input(data, "training")])
            return cls(mlflow, info.run_id, config, data, patience_s=tracking.patience_s, batch_s=tracking.batch_s,
                       artifact_uri=info.artifact_uri)
        run_id = existing.info.run_id
        attempt = int(existing.data.tags.get(ATTEMPT_TAG, "1")) + 1
        mlflow.update_run(run_id, status="RUNNING")
        logged = mlflow.get_metric_history(run_id, "val/recon_mse")
        for key, value in {**tags, ATTEMPT_TAG: str(attempt)}.items():
            mlflow.set_tag(run_id, key, value)
        return cls(mlflow, run_id, config, data, logged_through=max((m.step for m in logged), default=0),
                   attempt=attempt, patience_s=tracking.patience_s, batch_s=tracking.batch_s,
                   artifact_uri=existing.info.artifact_uri)

    def set_tag(self, key: str, value: str) -> None:
        self.outbox.send(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, value))

    def log_epoch(self, end: EpochEnd) -> None:
        """One batch of metrics per epoch (step = epoch); reconstructions at a few epochs."""
        if end.epoch <= self.logged_through:  # logged before the trial was restored
            return
        self.log_metrics(end.metrics, end.epoch)
        if end.epoch in self.draw_at and end.model is not None:  # a simulated trial has no model to draw
            training = end.model.training
            with tempfile.TemporaryDirectory() as folder:
                picture = Path(folder) / f"epoch_{end.epoch:04d}.png"
                self._draw(end.model, self.data.val_x, picture)
                self.outbox.send_file(picture, "images/reconstructions", self.client, self.run_id)
            end.model.train(training)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Timestamped now: metrics that wait (for the batch, or out an outage) arrive with the time they
        were measured. Sent at once, or with the others of `batch_s` seconds."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.waiting += [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if time.monotonic() - self.sent_at >= self.batch_s:
            self.send_waiting()

    def send_waiting(self) -> None:
        """The metrics waiting, in requests of MLflow's most (1,000 metrics each)."""
        batch, self.waiting, self.sent_at = self.waiting, [], time.monotonic()
        for start in range(0, len(batch), 1000):
            part = batch[start : start + 1000]
            steps = f"{part[0].step}" if part[0].step == part[-1].step else f"{part[0].step}-{part[-1].step}"
            self.outbox.send(f"metrics of step {steps}",
                             lambda part=part: self.client.log_batch(self.run_id, metrics=part, synchronous=True))

    def catch_up(self, history: list[dict[str, float]]) -> None:
        """A restored trial's epochs that its checkpoint holds but the run does not (their metrics had
        not left when the trial's process died): logged now, so that the run has every epoch once."""
        for epoch, metrics in enumerate(history, 1):
            if epoch > self.logged_through:
                self.log_metrics(metrics, epoch)
        self.logged_through = max(self.logged_through, len(history))

    def finish(self, result: TrainResult, best_checkpoint: Path | None, drawn: Path | None = None) -> str:
        """The test suite, the final pictures, the best checkpoint; then waits (up to the patience)
        until the server has everything. Returns what it could not deliver ('' if nothing).
        `drawn`: a local run folder whose pictures are already drawn (they are logged as they are)."""
        from aesearch.training.images import save_pictures

        self.log_metrics(result.metrics, len(result.history))
        with tempfile.TemporaryDirectory() as folder:
            if drawn is None and result.model is not None:  # a simulated trial has none
                save_pictures(result.model, self.data, self.config, folder)
            for picture in sorted(Path(drawn or folder).glob("*.png")):
                self.outbox.send_file(picture, "images", self.client, self.run_id)
        if best_checkpoint is not None and best_checkpoint.is_file():
            self.outbox.send_file(best_checkpoint, Path(BEST_CHECKPOINT).parent.as_posix(), self.client, self.run_id)
        return self.wait_for_server()

    def close(self, outcome: Outcome, undelivered: str) -> bool:
        """A trial whose outcome is its own (it completed, or diverged) closes its run before its last
        report, which says so (`closed`): the driver, one process for every trial of the search, is
        spared two requests per trial. Only once every record arrived (`undelivered` is ''), and never
        for a failed request: the driver then closes the run, after waiting out the server."""
        if undelivered:
            return False
        started = time.perf_counter()
        try:
            close_run(self.client, self.run_id, outcome)
        except Exception:  # whatever went wrong, the driver closes it
            return False
        finally:
            self.direct_seconds += time.perf_counter() - started
        return True

    def wait_for_server(self) -> str:
        """Deliver what waits (up to the patience); returns what could not be delivered ('' if nothing)."""
        self.send_waiting()
        self.outbox.deliver(self.patience_s)
        return self.outbox.undelivered()

    def _draw(self, model: Any, x: torch.Tensor, path: Path) -> None:
        from torchvision.utils import save_image

        from aesearch.training.images import reconstruction_grid

        sample = x[: self.config.evaluation.image_count].to(next(model.parameters()).device)
        save_image(reconstruction_grid(model, sample, self.config.corruption.kind, self.config.corruption.level), path)


def log_invalid_trial(tracking: Tracking, trial_id: str, number: str, params: dict[str, Any], error: str) -> str:
    """A trial whose sampled parameters make no valid config still gets its run (with the reason)."""
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow = client(tracking.uri)
    existing = find_trial_run(mlflow, tracking.experiment_id, trial_id)
    if existing is not None:
        return existing.info.run_id
    tags = {MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id, "error": error[:5000]}
    run_id = mlflow.create_run(tracking.experiment_id, run_name=f"invalid-#{number}", tags=tags).info.run_id
    mlflow.log_batch(run_id, params=[Param(k, as_param(v)) for k, v in params.items()], synchronous=True)
    return run_id

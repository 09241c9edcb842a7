"""One trainer for every variant: `train(config, data, reporter) -> TrainResult`.

Ray trials and local runs (`aesearch train`, reproduction) call this same function; they differ
only in the reporter they pass, which receives each epoch's metrics and can save a checkpoint.

Why it is fast: the whole dataset sits on the training device as tensors, shuffling is a
`randperm` there, corruption is a batched tensor op, and the step loop never synchronises with
the host: loss terms accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from aesearch.config import TrainConfig, check_data, parse_config, resolve_device
from aesearch.errors import CheckpointError, DivergedError
from aesearch.metrics import is_use_metric, selection_key
from aesearch.parts.clustering import REFINEMENTS, number_of_clusters
from aesearch.parts.corruption import corrupt
from aesearch.parts.data import Data, DataSpec, check_fits
from aesearch.parts.data.binarize import BINARIZATIONS, fresh_bits
from aesearch.parts.models import Autoencoder, build_model, parameter_count
from aesearch.parts.objectives import Objective, random_directions
from aesearch.parts.optimizers import OPTIMIZERS, SCHEDULES
from aesearch.schema import flatten
from aesearch.training.checkpoints import load_checkpoint, save_checkpoint
from aesearch.training.evaluate import evaluate
from aesearch.training.refinement import Refiner, fit_centres
from aesearch.training.scoring import FittedScorer, fit_scorer
from aesearch.training.validation import UseMetrics


@dataclass
class EpochEnd:
    """What a reporter receives after each epoch."""

    epoch: int  # epochs completed, from 1
    metrics: dict[str, float]
    is_best: bool  # the best epoch so far by `evaluation.select_by`, ties broken by the lower val/loss
    save_checkpoint: Callable[[Path | str], None]
    model: Autoencoder | None  # the live model (a reporter that draws with it restores its mode); None: simulated


Reporter = Callable[[EpochEnd], None]


class Inputs(NamedTuple):
    """A batch as one step sees it; every random draw in it comes from the run's generator."""

    x: torch.Tensor  # clean: what the reconstruction is compared with
    x_in: torch.Tensor  # what the encoder is fed (corrupted, for a denoising AE)
    noise: torch.Tensor | None  # (batch, latent_dim) standard normal: a gaussian latent's sample
    directions: torch.Tensor | None  # (projections, batch, latent_dim) signs: the contractive estimator's


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[dict[str, float]]  # one entry per epoch
    metrics: dict[str, float]  # test/... of the best weights, and a summary of the run
    best_epoch: int
    model: Autoencoder | None  # holding the best weights, in eval mode; None: a simulated trial (training.simulated)
    fingerprint: str


def train(
    config: TrainConfig,
    data: Data,
    reporter: Reporter | None = None,
    resume_from: Path | str | dict[str, Any] | None = None,
    run_evaluation: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `config` on `data` (moved to the config's device), evaluate the best weights.

    `resume_from`: a checkpoint (path, or its loaded state) to continue from exactly.
    `stop_after`: end after this epoch, as an early stop does: the schedules (KL annealing)
    still span `config.epochs`, so the first epochs are exactly those of a full run.
    """
    trainer = Trainer(config, data)
    if resume_from is not None:
        state = resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from)
        trainer.restore(state)
    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    started = time.perf_counter()
    while trainer.epoch < last_epoch and not trainer.converged:
        end = trainer.run_epoch()
        if reporter is not None:
            reporter(end)
    return trainer.result(time.perf_counter() - started, run_evaluation)


RESUMABLE_CHANGES = {"name", "epochs", "runtime", "evaluation"}  # what a resumed run may set differently


def check_resumable(state: dict[str, Any], config: TrainConfig, data: Data) -> None:
    """Refuse a checkpoint made on other data or with other training settings."""
    if state["fingerprint"] != data.fingerprint:
        raise CheckpointError(
            f"checkpoint made on dataset fingerprint {state['fingerprint']}, but the data now has "
            f"fingerprint {data.fingerprint}: the dataset or its split changed"
        )
    saved = flatten(parse_config(state["config"], source="checkpoint config").model_dump(mode="json"))
    asked = flatten(config.model_dump(mode="json"))
    changed = [
        name for name, value in asked.items() if name.split(".")[0] not in RESUMABLE_CHANGES and saved.get(name) != value
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint was trained with other settings ({', '.join(changed)} differ); a resumed run "
            f"may change only {', '.join(sorted(RESUMABLE_CHANGES))}"
        )


def initial_model(config: TrainConfig, spec: DataSpec) -> Autoencoder:
    """The model with its initial weights, a function of `config.seed` alone.

    torch's layers draw their initial weights from the global CPU generator and take no
    generator of their own: it is seeded on a fork, so the caller's random state is as it was.
    """
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: the model is built there
        torch.default_generator.manual_seed(config.seed)  # torch.manual_seed would reseed CUDA's too
        return build_model(config.model, spec)


@contextlib.contextmanager
def deterministic_cudnn(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic kernels, for this block only, on CUDA.

    Some of its convolution backward kernels add with atomics, in no fixed order: with them a
    run would not repeat bit for bit (same seed, or resumed from a checkpoint). The flags are
    process-wide, so they are set around the passes that differentiate (training, and validation
    of a contractive objective) and put back as the caller had them. Forward-only passes (the
    evaluation suite) need none: cuDNN's forward kernels are deterministic.
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


class Trainer:
    """The state of one training run and the epoch it knows how to run next."""

    def __init__(self, config: TrainConfig, data: Data):
        self.config = config
        self.device = resolve_device(config.runtime.device)
        # Every draw of training (data order, corruption, latent samples) comes from the run's own
        # generator: what else runs in the process cannot shift it, and a packed step can keep
        # each member's draws exactly those of its unpacked run.
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        check_data(config, data.spec)  # the user's data is known only now
        if self.device.type == "cuda" and data.device != self.device:
            check_fits(data.nbytes, f"{config.data.dataset} ({data.spec.describe()})", str(self.device))
        self.data = data.to(self.device)
        self.validation_x = self.data.normal_val_x  # the validation loss: on normal rows only
        self.binarize_batches = BINARIZATIONS[config.data.binarize].fresh_batches  # the others were drawn at loading
        self.model = initial_model(config, data.spec).to(self.device)
        self.channels_last = (
            self.device.type == "cuda" and config.runtime.channels_last and config.model.architecture == "conv"
        )
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = Objective(config.objective, self.model.stochastic, config.epochs, data.spec)
        self.input_grad = self.objective.needs_input_grad(self.model)  # contractive estimator: d code / d x
        # A clustering refinement trains its centres with the weights, over the run's last epochs.
        self.refiner: Refiner | None = None
        self.refine_from = config.epochs  # the epochs before the refinement
        if REFINEMENTS[config.clustering.refinement].trains:
            clusters = number_of_clusters(config.clustering, len(data.spec.classes))
            self.refiner = Refiner(config.clustering, clusters, self.model.latent_dim, data.spec.features, self.device)
            self.refine_from = config.epochs - config.clustering.refine_epochs
        parameters = [*self.model.parameters(), *([self.refiner.centres] if self.refiner else [])]
        opt = config.optimizer
        self.optimizer = OPTIMIZERS[opt.name](
            parameters, opt.lr, opt.weight_decay, fused=self.device.type in ("cpu", "cuda")
        )
        self.schedule = SCHEDULES[opt.schedule.kind]
        self.scheduler = self.schedule.build(self.optimizer, opt.schedule, config.epochs)
        self.use_metrics = UseMetrics(config.evaluation.val_metrics, self.data, config.evaluation, config.clustering)
        self.size = {"model/parameters": float(parameter_count(self.model)),
                     "model/latent_dim": float(self.model.latent_dim)}
        # The best epoch's weights are the ones evaluated and kept. By default the lowest validation
        # objective (at the full beta, so annealing epochs with a smaller KL weight do not look
        # better than they are); a search selects by its own objective, ties (a saturated AUROC)
        # broken by the validation objective (aesearch.metrics.selection_key).
        self.select_by = config.evaluation.select_by
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0  # 0: none yet
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_scorer = FittedScorer()  # the anomaly scorer fitted to the best weights, for the checkpoint
        self.best_centres: torch.Tensor | None = None  # a refinement's centres at the best epoch

    @property
    def refining(self) -> bool:
        """Does the next epoch (or the one being finished) refine the clusters?"""
        return self.refiner is not None and self.epoch >= self.refine_from

    @property
    def converged(self) -> bool:
        """Has the refinement converged (fewer than clustering.tol of the assignments changed)? The run ends."""
        return self.refiner is not None and self.refiner.converged

    @property
    def clusters_wanted(self) -> bool:
        """Is the run trained to cluster (a refinement, clustering.clusters, or per-epoch cluster metrics)?
        Its checkpoint then keeps centres, so that `aesearch encode` and the served model give clusters."""
        clustering = self.config.clustering
        return (self.refiner is not None or clustering.clusters is not None
                or any(name.startswith("val/cluster_") for name in self.config.evaluation.val_metrics))

    def fitted_centres(self) -> torch.Tensor | None:
        """Centres for new inputs, where the run clusters: the mean code of each of the clusterer's
        groups of the fixed validation rows the per-epoch metrics use."""
        clusters = number_of_clusters(self.config.clustering, len(self.data.spec.classes))
        if not self.clusters_wanted or clusters is None:
            return None
        return fit_centres(self.model, self.use_metrics.x, clusters, self.config.evaluation, self.config.clustering)

    @property
    def centres(self) -> torch.Tensor | None:
        """The refinement's centres, once placed: what assigns codes to clusters."""
        return self.refiner.centres.detach() if self.refiner is not None and self.refiner.started else None

    # --- one epoch ---------------------------------------------------------------------------

    def run_epoch(self) -> EpochEnd:
        started = time.perf_counter()
        train, mean_beta = self._train_pass()
        return self.finish_epoch(train, mean_beta, started)

    def finish_epoch(self, train: dict[str, float], mean_beta: float, started: float) -> EpochEnd:
        """Validate, record the epoch and keep the best weights, after a training pass (this
        trainer's own, or a packed one that trained this model with others)."""
        val = self.validate()
        if self.use_metrics:
            val |= self.use_metrics(self.model, self.centres if self.refining else None)
        self.epoch += 1
        metrics = {"epoch": float(self.epoch), **train, **val, **self.size, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.objective.uses_kl:
            metrics["beta"] = mean_beta  # the KL weight in effect, averaged over the epoch's steps
        metrics["time/epoch_seconds"] = time.perf_counter() - started  # the passes have synced
        if not all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/recon_mse")):
            raise DivergedError(self.epoch, {k: v for k, v in metrics.items() if "/" in k})
        self.history.append(metrics)
        self.schedule.advance(self.scheduler, metrics["val/loss"])  # the next epoch's lr

        # A refinement's epochs supersede the epochs before it: the refined model is the one wanted. Its
        # targets move at every update, so its loss does not compare across epochs: unless the run
        # selects by a metric of what the model is for (val/cluster_ari), its last epoch is kept.
        refined = self.refiner is not None and self.epoch > self.refine_from
        supersedes = refined and (self.best_epoch <= self.refine_from or not is_use_metric(self.select_by))
        is_best = self.best_epoch == 0 or supersedes or (
            selection_key(self.select_by, metrics) < selection_key(self.select_by, self.history[self.best_epoch - 1]))
        if is_best:
            self.best_centres = self.centres.clone() if self.centres is not None else self.fitted_centres()
            self.best_epoch = self.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_scorer = self.use_metrics.scorer or fit_scorer(self.model, self.data, self.config.evaluation)
        return EpochEnd(self.epoch, metrics, is_best, self.save, self.model)

    def inputs(self, x: torch.Tensor, training: bool = False) -> Inputs:
        """A batch and every random draw of its step, from the run's generator; a training batch
        binarised afresh first with `data.binarize: dynamic`."""
        if training and self.binarize_batches:
            x = fresh_bits(x, self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_in = corrupt(x, self.config.corruption.kind, self.config.corruption.level, self.generator, self.data.spec)
        code_shape = (len(x), self.model.latent_dim)
        noise = directions = None
        if self.model.stochastic:
            noise = torch.randn(code_shape, device=x.device, generator=self.generator)
        if self.input_grad:
            x_in = x_in.detach().requires_grad_(True)
            directions = random_directions(self.config.objective.contractive_projections, code_shape, self.generator,
                                           x.device)
        return Inputs(x, x_in, noise, directions)

    def forward_context(self) -> contextlib.ExitStack:
        """bf16 autocast on CUDA; the math attention kernel when the loss differentiates twice
        (the fused attention kernels have no double backward)."""
        stack = contextlib.ExitStack()
        enabled = self.device.type == "cuda" and self.config.runtime.bf16
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled))
        if self.input_grad:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def _train_pass(self) -> tuple[dict[str, float], float]:
        """One pass over the training data: (mean loss and terms, mean beta)."""
        model, optimizer, objective = self.model, self.optimizer, self.objective
        model.train()
        images, batch_size = self.data.train_x, self.config.optimizer.batch_size
        steps = math.ceil(len(images) / batch_size)
        order = self.shuffled_order()
        refiner = self.refiner if self.refining else None
        term_names = [*objective.term_names, *(["cluster_kl"] if refiner else [])]
        if refiner is not None and not refiner.started:
            refiner.start(model, images, self.config.evaluation)
            model.train()
        sums = torch.zeros(1 + len(term_names), device=self.device)
        beta_sum = 0.0
        with deterministic_cudnn(self.device):
            for step in range(steps):
                beta = objective.beta(self.epoch + step / steps)  # plain Python arithmetic: no sync
                beta_sum += beta
                start = step * batch_size
                rows = order[start : start + batch_size]
                if refiner is not None and step % self.config.clustering.update_interval == 0:
                    refiner.update(model, images, self.config.evaluation.batch_size)
                x, x_in, noise, directions = self.inputs(images[rows], training=True)
                with self.forward_context():
                    output = model(x_in, noise=noise)
                    loss, terms = objective(model, x, x_in, output, beta, directions)
                    if refiner is not None:
                        loss, kl = refiner.loss(loss, output.latent.code, rows)
                        terms = {**terms, "cluster_kl": kl}
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums.add_(torch.stack([loss.detach(), *(t.detach() for t in terms.values())]), alpha=len(x))
        values = (sums / len(images)).tolist()  # the one host sync of the pass
        return dict(zip(["train/loss", *(f"train/{n}" for n in term_names)], values)), beta_sum / steps

    def shuffled_order(self) -> torch.Tensor:
        """This epoch's order of the training images."""
        return torch.randperm(len(self.data.train_x), device=self.device, generator=self.generator)

    def validate(self) -> dict[str, float]:
        """The objective on validation data (corrupted and sampled as in training, at the full
        beta), and the reconstruction MSE of clean inputs through the latent mean: the
        yardstick shared by every variant."""
        model, objective, beta = self.model, self.objective, self.objective.full_beta
        model.eval()
        images, batch_size = self.validation_x, self.config.evaluation.batch_size
        sums = torch.zeros(2 + len(objective.term_names), device=self.device)
        for start in range(0, len(images), batch_size):
            x, x_in, noise, directions = self.inputs(images[start : start + batch_size])
            with deterministic_cudnn(self.device), torch.set_grad_enabled(self.input_grad), self.forward_context():
                output = model(x_in, sample=True, noise=noise)
                loss, terms = objective(model, x, x_in, output, beta, directions)
                with torch.no_grad():
                    clean = output if (x_in is x and not model.stochastic) else model(x, sample=False)
                    squared_error = (clean.x_hat.float() - x).pow(2).flatten(1).mean(1).sum()
            batch = torch.stack([loss.detach(), *(t.detach() for t in terms.values()), squared_error / len(x)])
            sums.add_(batch, alpha=len(x))
        values = (sums / len(images)).tolist()
        names = ["val/loss", *(f"val/{n}" for n in objective.term_names), "val/recon_mse"]
        val = dict(zip(names, values))
        if self.refining and self.refiner.started:  # the refinement's loss, as its training pass adds it
            kl = self.refiner.validation_kl(model, images, batch_size)
            weight = self.refiner.refinement.reconstruction_weight
            val |= {"val/loss": weight * val["val/loss"] + self.refiner.weight * kl, "val/cluster_kl": kl}
        return val

    # --- best weights, checkpoints -----------------------------------------------------------

    def result(self, train_seconds: float, run_evaluation: bool = True) -> TrainResult:
        """The run's result: the best weights, evaluated on the test split."""
        model = self.best_model()
        metrics = (evaluate(model, self.data, self.config.evaluation, self.config.clustering, self.best_centres)
                   if run_evaluation else {})
        best_epoch = self.history[self.best_epoch - 1]
        metrics.update(
            {
                "best/epoch": float(self.best_epoch),
                **{f"best/{name}": best_epoch[name] for name in dict.fromkeys(
                    ["val/loss", "val/recon_mse", self.select_by, *self.config.evaluation.val_metrics])},
                "model/parameters": self.size["model/parameters"],
                "time/train_seconds": train_seconds,
            }
        )
        return TrainResult(self.config, self.history, metrics, self.best_epoch, model, self.data.fingerprint)

    def best_model(self) -> Autoencoder:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        if self.refiner is not None and self.best_centres is not None:
            self.refiner.centres.data.copy_(self.best_centres)
        return self.model.eval()

    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "fingerprint": self.data.fingerprint,
            "data_spec": self.data.spec.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.scheduler.state_dict(),
            "rng": {"generator": self.generator.get_state()},
            "history": self.history,
            "best": {"epoch": self.best_epoch, "model": self.best_state},
            "anomaly_scorer": self.best_scorer.to_checkpoint(),
            "clustering": None if self.refiner is None else {
                "centres": self.refiner.centres.detach(), **self.refiner.state()},
            "cluster_centres": self.best_centres,
        }

    def save(self, path: Path | str) -> None:
        save_checkpoint(path, self.state())

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where a checkpoint left off (same data, same model shape)."""
        check_resumable(state, self.config, self.data)
        self.model.load_state_dict(state["model"])
        if self.refiner is not None:
            refined = state.get("clustering")
            if refined is None:
                raise CheckpointError("checkpoint has no clustering refinement state: not a checkpoint of this config")
            self.refiner.centres.data.copy_(refined["centres"])
            self.refiner.restore(refined)
        centres = state.get("cluster_centres")
        self.best_centres = None if centres is None else centres.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if "schedule" in state:  # checkpoints of an aesearch without schedules had only the constant one
            self.scheduler.load_state_dict(state["schedule"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        best = state["best"]
        if not 0 <= best["epoch"] <= len(self.history):
            raise CheckpointError(f"checkpoint's best epoch {best['epoch']} is not among its {len(self.history)} "
                                  "recorded epochs: not a checkpoint aesearch wrote")
        self.best_epoch = best["epoch"]
        self.best_state = None if best["model"] is None else {k: v.to(self.device) for k, v in best["model"].items()}
        self.best_scorer = FittedScorer.from_checkpoint(state)
        if self.best_scorer.kind != self.config.evaluation.anomaly_score and self.best_state is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # resumed with another scorer
            self.best_scorer = fit_scorer(self.best_model(), self.data, self.config.evaluation)
            self.model.load_state_dict(current)
        if "generator" not in state["rng"]:
            raise CheckpointError("checkpoint has no training generator state (made by an older aesearch): train it again")
        self.generator.set_state(state["rng"]["generator"])

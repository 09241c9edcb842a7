"""The training config: the parts' sections composed into one typed schema.

A config says what to train: which dataset, which autoencoder (architecture + latent), which
objective (reconstruction + weighted terms), which input corruption, which optimiser, how to
evaluate. Each part owns its own section and its defaults (`parts.data.DataConfig`, ...); this
module adds the run's own sections (evaluation, runtime), the rules that tie parts together, and
loading. Named variants (VAE, sparse AE, ...) are nothing but values of these fields; see the
shipped configs (`aesearch/configs/`, loaded by name: `load_config("vae")`) and `variant_family`.

Configs are validated at the edge (`load_config`, `parse_config`): every problem becomes a
`ConfigError` whose one-line message names the field, the value and the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from aesearch.errors import ConfigError
from aesearch.metrics import USE_FAMILIES, USE_METRICS, denoised_kind, is_epoch_objective, is_use_metric, lookup
from aesearch.parts.clustering import ClusteringConfig, clustering_problem
from aesearch.parts.corruption import CORRUPTIONS, CorruptionConfig, corruption_level_problem, corruption_problem
from aesearch.parts.data import NUMERIC, DataConfig, DataSpec
from aesearch.parts.models import ModelConfig, input_problem
from aesearch.parts.objectives import KLConfig, ObjectiveConfig, reconstruction_problem
from aesearch.parts.optimizers import OptimizerConfig
from aesearch.parts.scorers import ANOMALY_SCORERS, scorer_input_problem, scorer_problem
from aesearch.plugins import absolute_entries, load_plugins
from aesearch.registry import Registry
from aesearch.schema import (
    Bool,
    Bounded,
    Float,
    Int,
    Name,
    Named,
    PositiveInt,
    Section,
    apply_overrides,
    broken_rule,
    describe_validation_error,
    load_yaml,
    named,
)
from aesearch.shipped import CONFIGS, resolve

if TYPE_CHECKING:
    import torch


class EvaluationConfig(Section):
    """The evaluation suite run on the test split after training."""

    iwae_samples: Bounded(10_000) = 100  # k of the importance-weighted bound on the NLL
    probe_max_samples: PositiveInt = 10_000  # training latents used by the probe and kNN
    knn_neighbors: Bounded(1000) = 5
    kmeans_restarts: Bounded(100) = 4
    activation_threshold: Float = Field(0.1, gt=0.0)  # |h_j| above this counts as active
    denoise_levels: dict[str, Float] = Field(
        default_factory=lambda: {"gaussian": 0.3, "salt_pepper": 0.2, "masking": 0.3, "uniform": 0.3}
    )
    image_count: Bounded(64) = 8
    batch_size: Bounded(65536) = 1000
    # After every epoch, on a fixed subset of the validation split: metrics of what the model is for
    # (aesearch.metrics.USE_METRICS, val/denoise_psnr_<kind>), so that a search can rank on them.
    val_metrics: list[str] = Field(default_factory=list)
    val_max_samples: Bounded(1_000_000) = 1000  # the subset's size: what these metrics cost per epoch
    val_iwae_samples: Bounded(10_000) = 20  # k of val/nll's bound (test/nll uses iwae_samples)
    # The epoch whose weights are kept, evaluated and checkpointed as best: best by this metric.
    select_by: str = "val/loss"
    # How an input's anomaly score is read from the model (aesearch.parts.scorers): val/anomaly_*,
    # test/anomaly_*, the checkpoint and `aesearch score` all use it. The code scores are fitted on at most
    # anomaly_fit_samples normal training rows. anomaly_neighbors: the k nearest normal rows that knn
    # averages the distances to (unset: 5) and lof compares densities with (unset: 20, scikit-learn's).
    anomaly_score: Named(ANOMALY_SCORERS) = "reconstruction"
    anomaly_neighbors: Bounded(1000) | None = None
    anomaly_fit_samples: Bounded(1_000_000) = 10_000

    @field_validator("val_metrics")
    @classmethod
    def _known_use_metrics(cls, names: list[str]) -> list[str]:
        for name in names:
            if not is_use_metric(name):
                raise broken_rule(f"evaluation.val_metrics: {name!r} is not a metric measured on validation "
                                  f"(one of {', '.join(USE_METRICS)}, val/denoise_psnr_<kind>, val/denoise_mse_<kind>)")
        if len(set(names)) != len(names):
            raise broken_rule(f"evaluation.val_metrics: {names} names a metric twice")
        return names

    @model_validator(mode="after")
    def _selected_by_a_measured_metric(self) -> EvaluationConfig:
        for measured in self.val_metrics:
            kind = denoised_kind(measured)
            if kind is not None and kind not in self.denoise_levels:
                raise broken_rule(f"evaluation.val_metrics: {measured!r} needs the level of {kind!r} noise in "
                                  f"evaluation.denoise_levels (it has {', '.join(self.denoise_levels) or 'none'})")
        name = self.select_by
        if name.startswith("model/") or not is_epoch_objective(name):
            raise broken_rule(f"evaluation.select_by={name!r}: not a metric measured every epoch (e.g. val/loss, "
                              "val/recon_mse, or one of evaluation.val_metrics)")
        if is_use_metric(name) and name not in self.val_metrics:
            raise broken_rule(f"evaluation.select_by={name!r}: add it to evaluation.val_metrics, so it is measured")
        return self

    @field_validator("denoise_levels")
    @classmethod
    def _levels_fit_kinds(cls, levels: dict[str, float]) -> dict[str, float]:
        for kind, level in levels.items():
            named(CORRUPTIONS, kind)
            problem = corruption_level_problem(kind, level, field=f"evaluation.denoise_levels.{kind}")
            if problem or kind == "none":
                raise broken_rule(problem or "evaluation.denoise_levels: 'none' is not a corruption to measure")
        return levels


class RuntimeConfig(Section):
    """How to run, not what: these never change the identity of a trial's results."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    bf16: Bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: Bool = True  # channels-last memory format for conv models on CUDA


class TrainConfig(Section):
    """Everything that defines one training run (one trial of a search)."""

    name: Name = "autoencoder"
    plugins: list[str] = Field(default_factory=list)  # modules of the user's own parts (aesearch.plugins)
    seed: Int = Field(0, ge=0)
    epochs: PositiveInt = Field(10, le=100_000)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _parts_fit_together(self) -> TrainConfig:
        model, objective = self.model, self.objective
        gaussian = model.latent == "gaussian"
        if not gaussian and objective.kl != KLConfig():
            raise broken_rule(f"objective.kl applies only to model.latent='gaussian', got {model.latent!r}")
        sparsity = objective.sparsity.kind
        if gaussian and sparsity != "none":
            raise broken_rule(
                f"objective.sparsity.kind={sparsity!r} needs model.latent='deterministic' (got 'gaussian')"
            )
        if model.code_activation == "auto":  # resolved on a copy: the caller's section stays as given
            self.model = model = model.model_copy(
                update={"code_activation": "sigmoid" if sparsity == "kl" else "none"}
            )
        if sparsity == "kl" and model.code_activation != "sigmoid":
            raise broken_rule(
                f"model.code_activation={model.code_activation!r}: objective.sparsity.kind='kl' needs "
                "code units in (0, 1), so it must be 'sigmoid' (or 'auto')"
            )
        if gaussian and model.code_activation != "none":
            raise broken_rule(
                f"model.code_activation={model.code_activation!r}: a gaussian latent's code is its "
                "mean and takes no activation; use 'none' (or 'auto')"
            )
        problem = scorer_problem(self.evaluation.anomaly_score, gaussian)
        if problem:
            raise broken_rule(problem)
        if self.clustering.refine_epochs >= self.epochs:
            raise broken_rule(f"clustering.refine_epochs={self.clustering.refine_epochs}: must be below epochs="
                              f"{self.epochs}, so that the autoencoder trains before its codes are clustered")
        if self.data.path is None:  # a built-in dataset is known before loading: check now, not in a trial
            problem = data_problem(self, self.data.known_spec)
            if problem:
                raise broken_rule(problem)
        return self


def data_problem(config: TrainConfig, spec: DataSpec) -> str | None:
    """What is wrong with this config for this data, asked of each part (does the architecture take
    these inputs, the reconstruction loss and the corruption these values), or None. The user's
    data is known once loaded: `check_data` asks then."""
    return (input_problem(config.model, spec) or reconstruction_problem(config.objective.reconstruction, spec)
            or corruption_problem(config.corruption.kind, spec)
            or clustering_problem(config.clustering, spec)
            or scorer_input_problem(config.evaluation.anomaly_score, spec)
            or next(filter(None, (metric_problem(name, config, spec) for name in measured_per_epoch(config))), None))


def measured_per_epoch(config: TrainConfig) -> list[str]:
    """The metrics that this config's run computes after each epoch besides its loss terms."""
    return list(dict.fromkeys([*config.evaluation.val_metrics, config.evaluation.select_by]))


@dataclass(frozen=True)
class Condition:
    """When a metric applies (the catalogue's `applies`), and the line a search gets where it does not."""

    holds: Callable[[TrainConfig, DataSpec], bool]
    missing: Callable[[str, TrainConfig], str]  # (metric, config) -> what is missing and how to give it


CONDITIONS: Registry[Condition] = Registry("condition")
CONDITIONS.add("always", Condition(lambda config, spec: True, lambda name, config: ""))
CONDITIONS.add("gaussian latent", Condition(
    lambda config, spec: config.model.latent == "gaussian",
    lambda name, config: (f"{name} applies to gaussian latents (VAEs) only, but this trial has model.latent="
                          f"{config.model.latent!r}: set model.latent: gaussian in base, or pick another objective")))
CONDITIONS.add("deterministic latent", Condition(
    lambda config, spec: config.model.latent == "deterministic",
    lambda name, config: f"{name} applies to deterministic latents only, but this trial has model.latent="
                         f"{config.model.latent!r}"))
CONDITIONS.add("labelled anomalies", Condition(
    lambda config, spec: bool(spec.anomalies),
    lambda name, config: (f"{name} needs labelled anomalies in the validation split, and {config.data.dataset} "
                          "names none: set data.anomaly to the labels of the anomalous rows")))
CONDITIONS.add("class labels", Condition(
    lambda config, spec: bool(spec.classes),
    lambda name, config: (f"{name} needs class labels, and {config.data.dataset} has none (give data.label, "
                          "a y array, or class folders)")))
CONDITIONS.add("values in [0, 1]", Condition(
    lambda config, spec: spec.unit_range,
    lambda name, config: f"{name} needs values in [0, 1], and {config.data.dataset} has real values"))
CONDITIONS.add("real-valued data", Condition(
    lambda config, spec: not spec.unit_range,
    lambda name, config: f"{name} is measured on real-valued data, and {config.data.dataset} has values in [0, 1]"))
CONDITIONS.add("tables with numeric columns", Condition(
    lambda config, spec: any(column.kind == NUMERIC for column in spec.columns),
    lambda name, config: f"{name} needs a table with numeric columns, and {config.data.dataset} has none"))


def metric_problem(name: str, config: TrainConfig, spec: DataSpec) -> str | None:
    """Why `name` cannot be measured for this config on this data (what it needs that they lack), or None."""
    if name.startswith(USE_FAMILIES):
        kind = denoised_kind(name)
        wanted = "val/denoise_psnr_" if spec.unit_range else "val/denoise_mse_"
        if not name.startswith(wanted):
            return (f"{name}: {config.data.dataset} has {'values in [0, 1]' if spec.unit_range else 'real values'}, "
                    f"so its denoising is measured as {wanted}{kind}")
        problem = corruption_problem(kind, spec)
        return f"{name}: {problem}" if problem else None
    metric = lookup(name)
    condition = CONDITIONS[metric.applies] if metric is not None else None
    if condition is not None and not condition.holds(config, spec):
        return condition.missing(name, config)
    return None


def check_data(config: TrainConfig, spec: DataSpec) -> None:
    """Raise a ConfigError if the config does not fit the loaded data (see data_problem)."""
    problem = data_problem(config, spec)
    if problem:
        raise ConfigError(problem)


# --- loading ------------------------------------------------------------------------------


def parse_config(document: Any, source: str = "config") -> TrainConfig:
    """Validate a parsed YAML/JSON document; all problems become one ConfigError line."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(document).__name__}")
    plugged_in(document, source)
    try:
        return TrainConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_validation_error(error)}" if source else describe_validation_error(error)) from None


def plugged_in(document: dict[str, Any], source: str, folder: Path | None = None) -> None:
    """Import the plug-ins a document names (`plugins:`) before it is validated: their parts are
    names it may use. Relative files are relative to `folder` (default: the working directory)."""
    try:
        load_plugins(document.get("plugins"), folder)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def load_config(path: Path | str, overrides: list[str] | None = None) -> TrainConfig:
    """Load a config file (or a shipped one by name: 'vae'), apply `key.path=value` overrides, validate.
    Plug-in files are relative to the file's folder."""
    file = resolve(path, CONFIGS)
    document = load_yaml(file)
    if document is None:
        document = {}
    if isinstance(document, dict):
        document = apply_overrides(document, overrides or [])
        plugged_in(document, str(path), Path(file).parent)  # the error names the entries as written
        document = absolute_entries(document, Path(file).parent)
    return parse_config(document, source=str(path))


# --- what a config is -----------------------------------------------------------------------


def variant_family(config: TrainConfig) -> str:
    """The named variant a config is, from its most distinctive part (objective before shape)."""
    model, objective = config.model, config.objective
    if model.latent == "gaussian":
        return "vae" if objective.kl.beta == 1.0 else "beta_vae"
    if objective.contractive_weight > 0:
        return "contractive"
    if objective.sparsity.kind != "none":
        return f"sparse_{objective.sparsity.kind}"
    if config.corruption.kind != "none":
        return "denoising"
    if model.architecture == "dense":
        return "stacked" if len(model.hidden_dims) >= 2 else "dense"
    return model.architecture


def on_device(config: TrainConfig, device: str | None) -> TrainConfig:
    """The config with `runtime.device` set (validated); None keeps the config's own."""
    if device is None:
        return config
    return parse_config(config.model_copy(update={"runtime": config.runtime.model_copy(
        update={"device": device})}).model_dump(), source="--device")


def resolve_device(name: str) -> torch.device:
    """`runtime.device` as a torch device: 'auto' is CUDA where there is one; CUDA where there is none
    is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name!r}: CUDA is not available on this machine")
    return device

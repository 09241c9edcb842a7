"""The training config: one typed schema, the single home of every default.

A config says what to train: which dataset, which autoencoder (architecture + latent), which
objective (reconstruction + weighted terms), which input corruption, which optimiser, how to
evaluate. Named variants (VAE, sparse AE, ...) are nothing but values of these fields; see
`configs/` and `variant_family`.

Configs are validated at the edge (`load_config`, `parse_config`): every problem becomes a
`ConfigError` whose one-line message names the field, the value and the rule. Part names are
checked against the registries of the modules that implement them.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from aesearch.corruption import CORRUPTIONS
from aesearch.data import DATASETS
from aesearch.errors import ConfigError
from aesearch.models import ACTIVATIONS, ARCHITECTURES, CODE_ACTIVATIONS, LATENTS
from aesearch.objectives import BETA_SCHEDULES, RECONSTRUCTIONS, SPARSITY_PENALTIES
from aesearch.optimizers import OPTIMIZERS
from aesearch.registry import Registry


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Integers and booleans are strict (no "16" or True for an int); floats accept ints and "1e-3"
# but neither booleans nor inf/nan (Section forbids those).
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


def Bounded(high: int) -> type[int]:
    """A positive int with an upper bound that keeps models and batches within reason."""
    return Annotated[int, Field(strict=True, ge=1, le=high)]


def broken_rule(message: str) -> PydanticCustomError:
    """A cross-field rule broken: its message names the fields and values itself."""
    return PydanticCustomError("rule", message.replace("{", "(").replace("}", ")"))


def _named(registry: Registry, value: str, extra: tuple[str, ...] = ()) -> str:
    if value in extra or value in registry:
        return value
    valid = ", ".join(sorted((*extra, *registry.names())))
    raise ValueError(f"unknown {registry.kind}; valid names: {valid}")


def Named(registry: Registry, *extra: str) -> type[str]:
    """A string field that must name an entry of `registry` (or one of `extra`)."""
    return Annotated[str, AfterValidator(lambda value: _named(registry, value, extra))]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class DataConfig(Section):
    """Which dataset and how it is split. Where the files live is a runtime option, not config."""

    name: Named(DATASETS) = "digits"
    val_fraction: Float = Field(0.1, gt=0.0, le=0.5)
    split_seed: Int = Field(0, ge=0)
    anomaly_class: Int | None = Field(None, ge=0, description="class held out of training as the anomaly")
    max_train_samples: PositiveInt | None = None



class ModelConfig(Section):
    """Encoder + latent + decoder. Architecture-specific fields are ignored by the others."""

    architecture: Named(ARCHITECTURES) = "dense"
    latent: Named(LATENTS) = "deterministic"
    latent_dim: Bounded(4096) = 16
    activation: Named(ACTIVATIONS) = "relu"
    # "auto": sigmoid when the KL sparsity penalty needs units in (0, 1), otherwise none.
    code_activation: Named(CODE_ACTIVATIONS, "auto") = "auto"
    # dense: widths of the hidden layers from the input side; the decoder mirrors them.
    hidden_dims: list[Bounded(16384)] = Field(default_factory=lambda: [256, 128], max_length=8)
    # conv: output channels of the stride-2 convolutions; the decoder mirrors them.
    conv_channels: list[Bounded(2048)] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=6)
    # attention: square patches, transformer width, heads, blocks (encoder and decoder each).
    patch_size: Bounded(64) = 4
    embed_dim: Bounded(2048) = 64
    heads: Bounded(64) = 4
    depth: Bounded(24) = 2
    mlp_ratio: Bounded(8) = 2





    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.architecture == "attention" and self.embed_dim % self.heads:
            raise broken_rule(
                f"model.embed_dim={self.embed_dim} must be divisible by model.heads={self.heads}"
            )
        return self


class KLConfig(Section):
    """KL(q(z|x) || N(0, I)) weighted by beta (>1 for beta-VAE), annealed per epoch."""

    beta: Float = Field(1.0, ge=0.0)
    schedule: Named(BETA_SCHEDULES) = "constant"
    warmup_epochs: Bounded(100_000) = 10  # linear: beta reaches its full value after this many epochs
    cycles: Bounded(10_000) = 4  # cyclical: number of ramps over the whole run
    ramp_fraction: Float = Field(0.5, gt=0.0, le=1.0)  # cyclical: share of each cycle spent ramping



class SparsityConfig(Section):
    """A sparsity penalty on the code: `l1` (sum |h_j|) or `kl` (sum_j KL(rho || rho_hat_j))."""

    kind: Named(SPARSITY_PENALTIES, "none") = "none"
    weight: Float = Field(1.0, ge=0.0)
    rho: Float = Field(0.05, gt=0.0, lt=1.0)



class ObjectiveConfig(Section):
    """Reconstruction loss (summed over pixels, averaged over the batch) + weighted terms."""

    reconstruction: Named(RECONSTRUCTIONS) = "mse"
    kl: KLConfig = Field(default_factory=KLConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    contractive_weight: Float = Field(0.0, ge=0.0)
    contractive_projections: Bounded(64) = 1  # random projections when no closed form exists



class CorruptionConfig(Section):
    """Denoising: corrupt the encoder's input; `level` is sigma, p or a depending on `kind`."""

    kind: Named(CORRUPTIONS) = "none"
    level: Float | None = None


    @model_validator(mode="after")
    def _level_fits_kind(self) -> CorruptionConfig:
        problem = corruption_level_problem(self.kind, self.level, field="corruption.level")
        if problem:
            raise broken_rule(problem)
        return self


def corruption_level_problem(kind: str, level: float | None, field: str) -> str | None:
    """What is wrong with `level` for a corruption of this kind, or None."""
    corruption = CORRUPTIONS[kind]
    if corruption.level_name is None:
        return f"{field}={level} given, but corruption {kind!r} takes no level" if level is not None else None
    if level is None:
        return f"{field} is required for corruption {kind!r} (its {corruption.level_name}; {corruption.rule_text})"
    if not corruption.level_rule(level):
        return f"{field}={level}: for {kind} the level is {corruption.level_name}, and {corruption.rule_text}"
    return None


class OptimizerConfig(Section):
    name: Named(OPTIMIZERS) = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    batch_size: Bounded(65536) = 128



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

    @field_validator("denoise_levels")
    @classmethod
    def _levels_fit_kinds(cls, levels: dict[str, float]) -> dict[str, float]:
        for kind, level in levels.items():
            _named(CORRUPTIONS, kind)
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

    # Names folders and runs, so: letters, digits, '.', '_' and '-', starting with a letter or digit.
    name: str = Field("autoencoder", max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: Int = Field(0, ge=0)
    epochs: PositiveInt = Field(10, le=100_000)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _parts_fit_together(self) -> TrainConfig:
        model, objective, spec = self.model, self.objective, DATASETS[self.data.name]
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
        _, height, width = spec.shape
        if model.architecture == "attention" and (height % model.patch_size or width % model.patch_size):
            raise broken_rule(
                f"model.patch_size={model.patch_size} must divide the {height}x{width} images of "
                f"{spec.name}"
            )
        if self.data.anomaly_class is not None and self.data.anomaly_class >= spec.num_classes:
            raise broken_rule(
                f"data.anomaly_class={self.data.anomaly_class} must be a class of {spec.name} "
                f"(0..{spec.num_classes - 1})"
            )
        return self


# --- loading, overrides, error messages -----------------------------------------------------


def parse_config(document: Any, source: str = "config") -> TrainConfig:
    """Validate a parsed YAML/JSON document; all problems become one ConfigError line."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(document).__name__}")
    try:
        return TrainConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_validation_error(error)}" if source else describe_validation_error(error)) from None


def load_yaml(path: Path | str) -> Any:
    """Read a YAML file safely (no arbitrary objects), with one-line errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        position = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{position}: {problem}") from None


def load_config(path: Path | str, overrides: list[str] | None = None) -> TrainConfig:
    """Load a config file, apply `key.path=value` overrides, validate."""
    document = load_yaml(path)
    if document is None:
        document = {}
    if isinstance(document, dict):
        document = apply_overrides(document, overrides or [])
    return parse_config(document, source=str(path))


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """`model.latent_dim=32` sets document['model']['latent_dim'] = 32 (values parsed as YAML)."""
    result = copy.deepcopy(document)  # keeps YAML aliases shared instead of expanding them
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        try:
            set_path(result, key.strip(), value)
        except ConfigError as error:
            raise ConfigError(f"--set {override!r}: {error}") from None
    return result


def set_path(document: dict, path: str, value: Any) -> None:
    """document[a][b][c] = value for path 'a.b.c', creating sections on the way (in place)."""
    node = document
    *sections, field = path.split(".")
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is a value, not a section")
        node = child
    node[field] = value


_SHORT = reprlib.Repr()  # a value in an error message is shown short, however big it is
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as `field=value: rule` phrases joined on one line."""
    phrases = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            phrases.append(f"{field}: unknown key")
        elif item["type"] == "missing":
            phrases.append(f"{field}: required")
        elif item["type"] == "rule":  # a cross-field rule: the message names its fields itself
            phrases.append(message)
        elif field:
            phrases.append(f"{field}={_SHORT.repr(item['input'])}: {message}")
        else:  # the document as a whole (not JSON, not a list)
            phrases.append(message)
    return "; ".join(phrases)


# --- what a config is -----------------------------------------------------------------------


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'latent_dim': 16}} -> {'model.latent_dim': 16}: one stable name per field."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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

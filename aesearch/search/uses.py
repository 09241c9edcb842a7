"""What the model is for: `use:` in a search space picks the objective(s) and the variants worth searching.

    name: my-detector
    data: {path: data/transactions.csv, label: Class, anomaly: [1]}
    use: anomaly_detection          # objective val/anomaly_auroc; plain, denoising, sparse, contractive AEs

Each use below is the part of a search space file it stands for. What the file gives itself wins:
its own `objective` or `space` replaces the use's, and its `base` is laid over the use's (its `budget`
over the use's ASHA settings: `compression` judges trials first at half of max_epochs). The spaces
use the dense architecture, which takes images and tables alike; add `model.architecture` to the
space to search convolutions or attention too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from aesearch.registry import Registry


def parameters(text: str) -> dict[str, Any]:
    """Search space parameters written as in a space file."""
    return yaml.safe_load(text)


# Shared by the spaces below: denoising (noise kind and level); depth, width and the learning rate.
DENOISING = parameters("""
corruption.kind: {type: categorical, choices: [none, gaussian, masking]}
sigma: {path: corruption.level, type: float, low: 0.05, high: 0.5, when: {corruption.kind: gaussian}}
p: {path: corruption.level, type: float, low: 0.05, high: 0.4, when: {corruption.kind: masking}}
""")
SHAPE = parameters("""
model.hidden_dims: {type: categorical, choices: [[128], [256, 128], [512, 256, 128]]}
optimizer.lr: {type: float, low: 0.0003, high: 0.003, log: true}
""")


@dataclass(frozen=True)
class Use:
    why: str  # one line: what the objective measures and why these variants
    objective: list[str]  # the metrics (each in its own direction)
    space: dict[str, Any]
    base: dict[str, Any] = field(default_factory=dict)
    # ASHA's first rung as a share of budget.max_epochs, and its reduction factor, where the file's budget
    # gives none (None: the schema's defaults)
    first_rung: float | None = None
    reduction_factor: float | None = None
    # A clustering refinement (clustering.refinement: idec) searched beside `space`, over this share of
    # budget.max_epochs (the trial's last epochs); None: not searched
    refine_share: float | None = None

    def fields(self, max_epochs: Any = None) -> dict[str, Any]:
        """The search space fields this use stands for, in a search of `max_epochs` epochs per trial."""
        return {"objective": [{"metric": metric} for metric in self.objective], "space": self.space_for(max_epochs),
                "base": self.base}

    def space_for(self, max_epochs: Any) -> dict[str, Any]:
        """`space`, and where the use refines clusters, the refinement: over the trials' last epochs."""
        if self.refine_share is None or not isinstance(max_epochs, int) or max_epochs < 2:
            return self.space
        epochs = max(1, min(max_epochs - 1, round(self.refine_share * max_epochs)))
        return self.space | parameters(f"""
clustering.refinement: {{type: categorical, choices: [none, idec]}}
clustering.refine_epochs: {{type: categorical, choices: [{epochs}], when: {{clustering.refinement: idec}}}}
""")

    def budget(self, max_epochs: Any) -> dict[str, Any]:
        """The budget fields this use sets for a search of `max_epochs` epochs per trial."""
        fields: dict[str, Any] = {}
        if self.reduction_factor is not None:
            fields["reduction_factor"] = self.reduction_factor
        if self.first_rung is not None and isinstance(max_epochs, int) and max_epochs > 0:  # else: the schema's error
            fields["grace_period"] = max(1, int(self.first_rung * max_epochs))
        return fields


USES: Registry[Use] = Registry("use")
USES.add("reconstruction", Use(
    "the lowest reconstruction error of clean inputs; plain and denoising autoencoders",
    ["val/recon_mse"],
    parameters("model.latent_dim: {type: categorical, choices: [8, 16, 32, 64]}") | DENOISING | SHAPE))
USES.add("anomaly_detection", Use(
    "how well the anomaly score separates the labelled anomalies of validation (AUROC); small codes, "
    "denoising, sparse and contractive autoencoders, which reconstruct what is normal only, and the "
    "score: reconstruction error, distance to the normal codes (knn, mahalanobis), all three combined, or the "
    "local outlier factor of the input beside its residual (lof)",
    ["val/anomaly_auroc"],
    parameters("""
evaluation.anomaly_score: {type: categorical, choices: [reconstruction, knn, mahalanobis, combined, lof]}
model.latent_dim: {type: categorical, choices: [2, 4, 8, 16, 32]}
objective.sparsity.kind: {type: categorical, choices: [none, l1]}
objective.sparsity.weight: {type: float, low: 0.001, high: 0.1, log: true, when: {objective.sparsity.kind: l1}}
objective.contractive_weight: {type: categorical, choices: [0.0, 0.01, 0.1]}
optimizer.weight_decay: {type: categorical, choices: [0.0, 0.0001]}
""") | DENOISING | SHAPE))
USES.add("clustering", Use(
    "how well the clusters of the validation codes recover the classes (ARI); small codes of plain, "
    "denoising and variational autoencoders, the clusterer (KMeans, a Gaussian mixture, UMAP + a "
    "mixture) and whether IDEC refines the clusters over the last third of the epochs",
    ["val/cluster_ari"],
    parameters("""
clustering.clusterer: {type: categorical, choices: [kmeans, gmm, umap_gmm]}
model.latent: {type: categorical, choices: [deterministic, gaussian]}
model.latent_dim: {type: categorical, choices: [2, 4, 8, 10, 16, 32]}
objective.kl.beta: {type: float, low: 0.25, high: 4.0, log: true, when: {model.latent: gaussian}}
""") | DENOISING | SHAPE,
    refine_share=1 / 3))
USES.add("generation", Use(
    "the likelihood of validation data (the IWAE bound on the NLL, nats); variational autoencoders: "
    "KL weight and schedule, code size",
    ["val/nll"],
    parameters("""
model.latent_dim: {type: categorical, choices: [8, 16, 32, 50, 64]}
objective.kl.beta: {type: float, low: 0.25, high: 2.0, log: true}
objective.kl.schedule: {type: categorical, choices: [constant, linear, cyclical]}
""") | SHAPE,
    base={"model": {"latent": "gaussian"}}))
USES.add("compression", Use(
    "two objectives at once: the reconstruction error and the code's size (model/latent_dim); "
    "the Pareto front says what each size of code costs",
    ["val/recon_mse", "model/latent_dim"],
    parameters("model.latent_dim: {type: int, low: 2, high: 64, log: true}") | SHAPE,
    # The front holds only trials that ran to the end, and an error after one epoch says little of
    # the error at the last: each trial trains half its epochs, then MO-ASHA keeps the better half.
    first_rung=0.5, reduction_factor=2.0))


def apply_use(document: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """A search space document with its `use` spelled out (see the module's docstring); as it was
    without one, or with a `use` that is not known (the schema names the known ones). `max_epochs`
    is the budget's where the document gives none."""
    use = USES[document["use"]] if isinstance(document.get("use"), str) and document["use"] in USES else None
    if use is None:
        return document
    budget = document.get("budget") or {}
    epochs = budget.get("max_epochs", max_epochs) if isinstance(budget, dict) else max_epochs
    fields = copy.deepcopy(use.fields(epochs))  # the document is the caller's to change
    merged = {**document}
    for key in ("objective", "space"):
        merged.setdefault(key, fields.get(key))
    merged["base"] = _lay_over(fields.get("base", {}), document.get("base") or {})
    if isinstance(budget, dict):  # else: the schema's error
        merged["budget"] = {**use.budget(epochs), **budget}
    return {key: value for key, value in merged.items() if value is not None}


def _lay_over(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `under`, section by section."""
    laid = {**under}
    for key, value in over.items():
        laid[key] = _lay_over(laid[key], value) if isinstance(value, dict) and isinstance(laid.get(key), dict) else value
    return laid

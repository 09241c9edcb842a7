"""Stochastic binarisation of data in [0, 1]: the protocol of the VAE literature on MNIST.

Papers that report a VAE's NLL on MNIST (IWAE, Burda et al. 2015, and most since) train and test
on *stochastically* binarised images: each pixel is 1 with probability its grey level. Thresholding
at 0.5 instead gives an easier test set (about 10 nats lower on MNIST), so a figure measured that
way cannot be set beside theirs.

`data.binarize`:
- `none`: the grey levels as they are;
- `dynamic`: each training batch is drawn afresh from the run's generator (the trainer's
  `Inputs`), the usual way to train VAEs on MNIST; validation and test are drawn once;
- `static`: the training split is drawn once too, the same bits for every trial.

Every draw made once comes from a generator seeded per split (`SPLIT_SEEDS`), on the CPU: every
trial, every reproduction and every machine sees the same validation and test bits. The NLL and
ELBO of data in [0, 1] are measured on those test bits whatever the training data was
(`training.evaluate`), so `binarize: none` and `dynamic` report figures on the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aesearch.registry import Registry


@dataclass(frozen=True)
class Binarization:
    drawn_once: tuple[str, ...]  # the splits binarised once, at loading
    fresh_batches: bool  # each training batch binarised afresh, in the trainer


BINARIZATIONS: Registry[Binarization] = Registry("binarization")
BINARIZATIONS.add("none", Binarization((), fresh_batches=False))
BINARIZATIONS.add("dynamic", Binarization(("val", "test"), fresh_batches=True))
BINARIZATIONS.add("static", Binarization(("train", "val", "test"), fresh_batches=False))
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}  # the fixed draws, one generator per split


def fixed_bits(x: torch.Tensor, split: str) -> torch.Tensor:
    """The split's inputs binarised once, each value 1 with probability itself, from the split's
    fixed seed (drawn on the CPU whatever x's device, so every machine draws the same bits).
    Values already 0 or 1 stay as they are."""
    generator = torch.Generator().manual_seed(SPLIT_SEEDS[split])
    return torch.bernoulli(x.detach().float().cpu(), generator=generator).to(device=x.device, dtype=x.dtype)


def fresh_bits(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batch binarised afresh from a run's generator (on the batch's device): `dynamic`."""
    return torch.bernoulli(x, generator=generator)

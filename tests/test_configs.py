"""Every shipped config validates, is the variant its file is named after, and learns."""

import pytest

from aesearch.config import load_config, variant_family
from aesearch.training.trainer import Trainer
from tests.conftest import CONFIGS

NAMED_VARIANTS = {
    "dense", "stacked", "conv", "denoising", "sparse_l1", "sparse_kl", "contractive", "attention", "vae", "beta_vae",
}


def test_one_config_per_named_variant():
    assert {path.stem for path in CONFIGS} == NAMED_VARIANTS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates_as_its_variant(path):
    config = load_config(path)
    assert variant_family(config) == path.stem == config.name
    assert path.read_text().startswith("#"), "each config opens with a comment saying what it is"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_variant_trains_one_epoch_on_digits_and_lowers_its_loss(path, digits):
    config = load_config(path, ["runtime.device=cpu"])
    trainer = Trainer(config, digits)
    before = trainer.validate()["val/loss"]
    after = trainer.run_epoch().metrics["val/loss"]
    assert after < 0.97 * before, f"{path.stem}: val/loss {before:.3f} -> {after:.3f}"

import pytest
import torch

from aesearch.parts.models import build_model, parameter_count
from tests.conftest import make_config

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("architecture", ["dense", "conv", "attention"])
@pytest.mark.parametrize("latent", ["deterministic", "gaussian"])
def test_every_composition_reconstructs_the_input_shape_and_trains_every_parameter(dataset, architecture, latent):
    config = make_config(data={"name": dataset}, model={"architecture": architecture, "latent": latent, "latent_dim": 6})
    shape = SHAPES[dataset]
    model = build_model(config.model, shape).train()
    x = torch.rand(3, *shape)
    output = model(x)
    assert output.logits.shape == x.shape
    assert output.latent.code.shape == (3, 6)
    assert output.x_hat.min() >= 0 and output.x_hat.max() <= 1
    output.logits.sum().backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_gaussian_latent_samples_in_training_and_uses_the_mean_otherwise():
    config = make_config(model={"latent": "gaussian", "hidden_dims": [16]})
    model = build_model(config.model, (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    model.train()
    a, b = model.encode(x), model.encode(x)
    assert not torch.equal(a.z, b.z) and torch.equal(a.mu, b.mu)
    # the reparameterisation: z = mu + eps * sigma, with gradients reaching mu and logvar
    assert a.z.requires_grad and a.z.grad_fn is not None
    model.eval()
    assert torch.equal(model.encode(x).z, model.encode(x).mu)


def test_reparameterised_samples_have_the_encoded_moments():
    config = make_config(model={"latent": "gaussian", "hidden_dims": [], "latent_dim": 2})
    model = build_model(config.model, (1, 8, 8))
    x = torch.rand(1, 1, 8, 8).expand(20_000, -1, -1, -1)
    latent = model.encode(x, sample=True)
    sigma = torch.exp(0.5 * latent.logvar[0])
    assert torch.allclose(latent.z.mean(0), latent.mu[0], atol=4 * sigma.max().item() / 100)
    assert torch.allclose(latent.z.std(0), sigma, rtol=0.03)


def test_dense_depth_and_widths_are_configurable():
    config = make_config(model={"hidden_dims": [40, 30, 20], "latent_dim": 10})
    model = build_model(config.model, (1, 8, 8))
    widths = [m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [40, 30, 20]
    decoder_widths = [m.out_features for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert decoder_widths == [20, 30, 40, 64]


def test_attention_map_is_a_distribution_over_patches():
    config = make_config(data={"name": "mnist"}, model={"architecture": "attention", "patch_size": 7})
    model = build_model(config.model, (1, 28, 28)).eval()
    maps = model.encoder.attention_map(torch.rand(5, 1, 28, 28))
    assert maps.shape == (5, 4, 4)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(5), atol=1e-5)
    assert (maps >= 0).all()


def test_code_activation_bounds_the_code():
    config = make_config(model={"code_activation": "sigmoid", "hidden_dims": [8]})
    model = build_model(config.model, (1, 8, 8))
    code = model.encode(torch.randn(50, 1, 8, 8) * 10).code
    assert code.min() >= 0 and code.max() <= 1


def test_parameter_count_grows_with_width():
    small = build_model(make_config(model={"hidden_dims": [16]}).model, (1, 8, 8))
    large = build_model(make_config(model={"hidden_dims": [64]}).model, (1, 8, 8))
    assert parameter_count(large) > parameter_count(small) > 0

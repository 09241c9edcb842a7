import math

import pytest
import torch

from aesearch.parts.models import build_model
from aesearch.parts.objectives import (
    Choice,
    KLConfig,
    Objective,
    cyclical,
    gaussian_kl,
    jacobian_norm_estimate,
    kl_sparsity,
    l1_sparsity,
    linear_warmup,
    random_directions,
)
from tests.conftest import make_config


def test_kl_of_standard_normal_to_itself_is_zero():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert torch.allclose(gaussian_kl(mu, logvar), torch.zeros(4))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(gaussian_kl(mu, logvar), expected, atol=1e-5)


def test_kl_sparsity_is_zero_when_mean_activation_equals_rho():
    code = torch.full((10, 6), 0.05)
    assert kl_sparsity(code, 0.05).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_sparsity_matches_the_formula():
    code = torch.tensor([[0.2, 0.5], [0.4, 0.1]])  # rho_hat = (0.3, 0.3)
    rho, rho_hat = 0.1, 0.3
    per_unit = rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert kl_sparsity(code, rho).item() == pytest.approx(2 * per_unit, rel=1e-5)


def test_kl_sparsity_grows_away_from_rho():
    values = [kl_sparsity(torch.full((4, 3), a), 0.05).item() for a in (0.05, 0.1, 0.3, 0.6)]
    assert values == sorted(values) and values[1] > 0


def test_l1_sparsity_is_sum_over_units_mean_over_batch():
    code = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert l1_sparsity(code, 0.05).item() == pytest.approx((3 + 3) / 2)


def test_linear_warmup_rises_from_zero_to_one():
    kl = KLConfig(warmup_epochs=4)
    assert [linear_warmup(e, 10, kl) for e in (0, 0.5, 1, 2, 3, 4, 7)] == [0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_cyclical_schedule_restarts_each_cycle():
    kl = KLConfig(cycles=2, ramp_fraction=0.5)
    assert [cyclical(e, 8, kl) for e in range(8)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]


def test_cyclical_schedule_anneals_within_an_epoch_when_cycles_are_short():
    kl = KLConfig(cycles=4, ramp_fraction=0.5)  # one cycle per epoch
    assert [cyclical(p, 4, kl) for p in (0, 0.25, 0.5, 0.75, 1.0, 1.25)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]


def test_objective_beta_in_effect_scales_schedule():
    config = make_config(model={"latent": "gaussian"}, objective={"kl": {"beta": 4.0, "schedule": "linear", "warmup_epochs": 2}})
    objective = Objective(config.objective, gaussian_latent=True, epochs=5)
    assert [objective.beta(e) for e in (0, 1, 1.5, 2, 3)] == [0.0, 2.0, 3.0, 4.0, 4.0]
    assert objective.full_beta == 4.0


def _contractive_model(hidden_dims, code_activation="sigmoid", latent="deterministic"):
    config = make_config(model={"hidden_dims": hidden_dims, "latent_dim": 5, "code_activation": code_activation, "latent": latent})
    torch.manual_seed(0)
    return build_model(config.model, (1, 3, 4))


def _autograd_jacobian_norm(model, x):
    """||d code / d x||_F^2 per sample from the full Jacobian (the reference)."""
    norms = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(lambda s: model.encode(s.unsqueeze(0), sample=False).code[0], sample)
        norms.append(jacobian.pow(2).sum())
    return torch.stack(norms)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "none", "relu"])
def test_contractive_closed_form_equals_autograd_jacobian(activation):
    model = _contractive_model([], activation)
    x = torch.rand(6, 1, 3, 4)
    latent = model.encode(x, sample=False)
    exact = model.exact_jacobian_norm(latent)
    assert exact is not None
    assert torch.allclose(exact, _autograd_jacobian_norm(model, x), rtol=1e-5, atol=1e-6)


def test_contractive_closed_form_for_gaussian_mean():
    model = _contractive_model([], "none", latent="gaussian")
    x = torch.rand(3, 1, 3, 4)
    exact = model.exact_jacobian_norm(model.encode(x, sample=False))
    assert torch.allclose(exact, _autograd_jacobian_norm(model, x), rtol=1e-5)


def test_deep_encoder_has_no_closed_form_and_the_estimator_is_unbiased():
    model = _contractive_model([7, 6])
    x = torch.rand(4, 1, 3, 4, requires_grad=True)
    latent = model.encode(x, sample=False)
    assert model.exact_jacobian_norm(latent) is None
    directions = random_directions(4000, tuple(latent.code.shape), torch.Generator().manual_seed(1))
    estimate = jacobian_norm_estimate(lambda v: torch.autograd.grad(latent.code, x, v, retain_graph=True)[0], directions)
    reference = _autograd_jacobian_norm(model, x.detach())
    assert torch.allclose(estimate, reference, rtol=0.08)


def test_contractive_term_is_differentiable_for_training():
    config = make_config(model={"hidden_dims": [8]}, objective={"contractive_weight": 1.0})
    model = build_model(config.model, (1, 8, 8)).train()
    objective = Objective(config.objective, gaussian_latent=False, epochs=1)
    x = torch.rand(4, 1, 8, 8)
    x_in = x.clone().requires_grad_(objective.needs_input_grad(model))
    directions = random_directions(2, (4, config.model.latent_dim))
    loss, terms = objective(model, x, x_in, model(x_in), beta=1.0, directions=directions)
    first_layer = model.encoder.layers[1].weight
    (grad,) = torch.autograd.grad(terms["contractive"], first_layer)
    assert grad.abs().sum() > 0


def test_reconstruction_compares_with_the_clean_input():
    config = make_config(corruption={"kind": "masking", "level": 0.5})
    model = build_model(config.model, (1, 8, 8))
    objective = Objective(config.objective, gaussian_latent=False, epochs=1)
    x = torch.rand(4, 1, 8, 8)
    x_in = torch.zeros_like(x)
    output = model(x_in)
    _, terms = objective(model, x, x_in, output, beta=1.0)
    expected = (output.x_hat - x).pow(2).flatten(1).sum(1).mean()
    assert terms["recon"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_objective_total_is_the_weighted_sum_of_its_terms():
    config = make_config(
        model={"hidden_dims": [8]},
        objective={"reconstruction": "bce", "sparsity": {"kind": "kl", "weight": 0.7, "rho": 0.1}, "contractive_weight": 0.3},
    )
    model = build_model(config.model, (1, 8, 8)).train()
    objective = Objective(config.objective, gaussian_latent=False, epochs=1)
    x = torch.rand(4, 1, 8, 8)
    x_in = x.clone().requires_grad_(True)
    loss, terms = objective(model, x, x_in, model(x_in), beta=1.0, directions=random_directions(1, (4, 16)))
    assert list(terms) == ["recon", "sparsity", "contractive"] == objective.term_names
    expected = terms["recon"] + 0.7 * terms["sparsity"] + 0.3 * terms["contractive"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_vae_objective_is_negative_elbo_with_bce_and_beta_one():
    config = make_config(model={"latent": "gaussian", "hidden_dims": [8]}, objective={"reconstruction": "bce"})
    model = build_model(config.model, (1, 8, 8))
    objective = Objective(config.objective, gaussian_latent=True, epochs=1)
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    output = model(x, sample=True)
    loss, terms = objective(model, x, x, output, beta=1.0)
    bernoulli = torch.distributions.Bernoulli(logits=output.logits)
    log_px_z = bernoulli.log_prob(x).flatten(1).sum(1)
    kl = gaussian_kl(output.latent.mu, output.latent.logvar)
    assert loss.item() == pytest.approx((-(log_px_z - kl)).mean().item(), rel=1e-5)


def test_stacked_choices_give_each_member_its_own_terms():
    """A packed step maps one objective's terms over its members' stacked choices (Choice.stack):
    every kind any member chose is computed, and each member's terms are exactly its own."""
    sections = [{"reconstruction": "bce", "sparsity": {"kind": "l1"}},
                {"reconstruction": "mse", "sparsity": {"kind": "kl", "rho": 0.2}}, {"reconstruction": "l1"}]
    configs = [make_config(model={"hidden_dims": [8], "code_activation": "sigmoid"}, objective=o) for o in sections]
    objectives = [Objective(c.objective, gaussian_latent=False, epochs=1) for c in configs]
    model = build_model(configs[0].model, (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    output = model(x)
    choice = Choice.stack([o.choice for o in objectives], units=torch.ones(3, configs[0].model.latent_dim))
    assert sorted(choice.reconstruction) == ["bce", "l1", "mse"] and sorted(choice.sparsity) == ["kl", "l1"]
    stacked = torch.func.vmap(lambda member: objectives[0].terms_with(model, x, output, member))(choice)
    assert list(stacked) == objectives[0].names(choice) == ["recon", "sparsity"]
    for i, objective in enumerate(objectives):
        own = objective.terms(model, x, x, output)
        assert torch.allclose(stacked["recon"][i], own["recon"], rtol=1e-6)
        assert torch.allclose(stacked["sparsity"][i], own.get("sparsity", torch.tensor(0.0)), rtol=1e-6)

import math
from types import SimpleNamespace

import pytest
import torch

from aesearch.errors import ConfigError
from aesearch.parts.data.spec import IMAGE, VECTOR, DataSpec
from aesearch.parts.models import build_model
from aesearch.parts.objectives import (
    RECONSTRUCTIONS,
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
    reconstruction_problem,
)
from tests.conftest import make_config
from tests.user_data import TABLE

REAL_VECTORS = DataSpec("features.npy", VECTOR, (4,), unit_range=False)


def images(shape=(1, 8, 8)) -> DataSpec:
    return DataSpec("digits", IMAGE, shape, unit_range=True, classes=tuple("0123456789"))


def _model(model_config, shape=(1, 8, 8)):
    return build_model(model_config, images(shape))


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
    objective = Objective(config.objective, gaussian_latent=True, epochs=5, spec=images())
    assert [objective.beta(e) for e in (0, 1, 1.5, 2, 3)] == [0.0, 2.0, 3.0, 4.0, 4.0]
    assert objective.full_beta == 4.0


def _contractive_model(hidden_dims, code_activation="sigmoid", latent="deterministic"):
    config = make_config(model={"hidden_dims": hidden_dims, "latent_dim": 5, "code_activation": code_activation, "latent": latent})
    torch.manual_seed(0)
    return _model(config.model, (1, 3, 4))


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
    model = _model(config.model).train()
    objective = Objective(config.objective, gaussian_latent=False, epochs=1, spec=images())
    x = torch.rand(4, 1, 8, 8)
    x_in = x.clone().requires_grad_(objective.needs_input_grad(model))
    directions = random_directions(2, (4, config.model.latent_dim))
    loss, terms = objective(model, x, x_in, model(x_in), beta=1.0, directions=directions)
    first_layer = model.encoder.layers[1].weight
    (grad,) = torch.autograd.grad(terms["contractive"], first_layer)
    assert grad.abs().sum() > 0


def test_reconstruction_compares_with_the_clean_input():
    config = make_config(corruption={"kind": "masking", "level": 0.5})
    model = _model(config.model)
    objective = Objective(config.objective, gaussian_latent=False, epochs=1, spec=images())
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
    model = _model(config.model).train()
    objective = Objective(config.objective, gaussian_latent=False, epochs=1, spec=images())
    x = torch.rand(4, 1, 8, 8)
    x_in = x.clone().requires_grad_(True)
    loss, terms = objective(model, x, x_in, model(x_in), beta=1.0, directions=random_directions(1, (4, 16)))
    assert list(terms) == ["recon", "sparsity", "contractive"] == objective.term_names
    expected = terms["recon"] + 0.7 * terms["sparsity"] + 0.3 * terms["contractive"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_vae_objective_is_negative_elbo_with_bce_and_beta_one():
    config = make_config(model={"latent": "gaussian", "hidden_dims": [8]}, objective={"reconstruction": "bce"})
    model = _model(config.model)
    objective = Objective(config.objective, gaussian_latent=True, epochs=1, spec=images())
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
    objectives = [Objective(c.objective, gaussian_latent=False, epochs=1, spec=images()) for c in configs]
    model = _model(configs[0].model)
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


# --- reconstruction losses know the data ---------------------------------------------------------


def test_mixed_loss_is_the_gaussian_and_categorical_nll_in_nats():
    logits = torch.tensor([[0.5, 2.0, 0.0, -1.0, -0.3], [1.0, -1.0, 1.0, 0.0, 2.5]])
    x = torch.tensor([[1.5, 0.0, 1.0, 0.0, 0.2], [-1.0, 0.0, 0.0, 1.0, 2.5]])

    def row_nll(lg, target, level):
        gaussian = sum(0.5 * (lg[i] - target[i]) ** 2 + 0.5 * math.log(2 * math.pi) for i in (0, 4))
        group = lg[1:4]
        log_normaliser = math.log(sum(math.exp(v) for v in group))
        return gaussian + log_normaliser - group[level]

    expected = [row_nll(logits[0].tolist(), x[0].tolist(), 1), row_nll(logits[1].tolist(), x[1].tolist(), 2)]
    assert RECONSTRUCTIONS["mixed"](logits, x, TABLE).tolist() == pytest.approx(expected, rel=1e-6)


def test_mixed_loss_on_plain_vectors_is_a_unit_gaussian_on_every_value():
    logits, x = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    expected = 0.5 * (1 + 0 + 4 + 0) + 4 * 0.5 * math.log(2 * math.pi)
    assert RECONSTRUCTIONS["mixed"](logits, x, REAL_VECTORS).item() == pytest.approx(expected, rel=1e-6)


def test_bce_is_refused_on_real_valued_data_with_one_line_and_allowed_on_unit_range():
    problem = reconstruction_problem("bce", TABLE)
    assert problem == ("objective.reconstruction='bce' needs values in [0, 1], but wine.csv is real-valued; "
                       "use 'l1', 'mixed' or 'mse'")
    assert reconstruction_problem("bce", images()) is None
    assert all(reconstruction_problem(kind, TABLE) is None for kind in ("mse", "l1", "mixed"))
    config = make_config(objective={"reconstruction": "bce"})
    with pytest.raises(ConfigError, match="needs values in"):
        Objective(config.objective, gaussian_latent=False, epochs=1, spec=TABLE)


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_errors_on_real_valued_data_compare_the_logits_themselves(kind):
    logits = x = torch.tensor([[3.0, -2.5, 7.0, 0.25]])
    assert RECONSTRUCTIONS[kind](logits, x, REAL_VECTORS).item() == 0.0  # no sigmoid: 3.0 is reachable
    unit_range = DataSpec("unit.npy", VECTOR, (4,), unit_range=True)
    assert RECONSTRUCTIONS[kind](logits, x, unit_range).item() > 1  # a sigmoid cannot reach 3.0


def test_errors_on_tables_compare_categorical_groups_as_probabilities():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]])
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0]])
    p = 1 / 3  # softmax of equal logits
    assert RECONSTRUCTIONS["mse"](logits, x, TABLE).item() == pytest.approx((1 - p) ** 2 + 2 * p**2, rel=1e-6)


def test_errors_on_unit_range_data_go_through_a_sigmoid_as_before():
    logits, x = torch.randn(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    expected = (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(1)
    assert torch.allclose(RECONSTRUCTIONS["mse"](logits, x, images((1, 2, 2))), expected)


def test_the_objective_uses_its_own_spec_in_its_terms():
    config = make_config(objective={"reconstruction": "mixed"})
    objective = Objective(config.objective, gaussian_latent=False, epochs=1, spec=TABLE)
    logits, x = torch.randn(6, 5), torch.randn(6, 5)
    output = SimpleNamespace(logits=logits, latent=SimpleNamespace(code=torch.randn(6, 2)))
    terms = objective.terms_with(None, x, output, objective.choice)
    assert terms["recon"].item() == pytest.approx(RECONSTRUCTIONS["mixed"](logits, x, TABLE).mean().item(), rel=1e-6)

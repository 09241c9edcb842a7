import pytest
import torch

from aesearch.parts.data.spec import CATEGORICAL, IMAGE, NUMERIC, VECTOR, Column, DataSpec
from aesearch.parts.models import LatentOutput, ModelConfig, Output, build_model, input_problem, parameter_count


def image(name: str, shape: tuple[int, int, int]) -> DataSpec:
    return DataSpec(name=name, modality=IMAGE, shape=shape, unit_range=True, classes=tuple(str(i) for i in range(10)))


IMAGES = {"digits": image("digits", (1, 8, 8)), "mnist": image("mnist", (1, 28, 28)),
          "cifar10": image("cifar10", (3, 32, 32))}
DIGITS = IMAGES["digits"]
# A table: two numeric columns, a categorical one over three levels (positions 2-4), a numeric one.
TABLE = DataSpec(name="t.csv", modality=VECTOR, shape=(6,), unit_range=False, columns=(
    Column("a", NUMERIC, 0), Column("b", NUMERIC, 1), Column("c", CATEGORICAL, 2, levels=("x", "y", "z")),
    Column("d", NUMERIC, 5)))
FEATURES = DataSpec(name="f.npy", modality=VECTOR, shape=(5,), unit_range=False)  # no columns: all numeric
VECTORS = {"table": TABLE, "features": FEATURES}


def model_config(**fields) -> ModelConfig:
    """The model section as a validated config leaves it (its "auto" code activation resolved)."""
    return ModelConfig(**{"code_activation": "none", **fields})


def table_rows(count: int) -> torch.Tensor:
    """Rows of TABLE: real numeric values, a one-hot categorical group."""
    rows = torch.randn(count, 6) * 3
    rows[:, 2:5] = torch.nn.functional.one_hot(torch.randint(3, (count,)), 3).float()
    return rows


def assert_every_parameter_trains(model: torch.nn.Module, logits: torch.Tensor) -> None:
    logits.sum().backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


@pytest.mark.parametrize("dataset", IMAGES)
@pytest.mark.parametrize("architecture", ["dense", "conv", "attention"])
@pytest.mark.parametrize("latent", ["deterministic", "gaussian"])
def test_every_composition_reconstructs_the_input_shape_and_trains_every_parameter(dataset, architecture, latent):
    model = build_model(model_config(architecture=architecture, latent=latent, latent_dim=6), IMAGES[dataset]).train()
    x = torch.rand(3, *IMAGES[dataset].shape)
    output = model(x)
    assert output.logits.shape == x.shape
    assert output.latent.code.shape == (3, 6)
    assert output.x_hat.min() >= 0 and output.x_hat.max() <= 1
    assert_every_parameter_trains(model, output.logits)


@pytest.mark.parametrize("vector", VECTORS)
@pytest.mark.parametrize("architecture", ["dense", "attention"])
@pytest.mark.parametrize("latent", ["deterministic", "gaussian"])
def test_vector_models_reconstruct_the_vector_and_train_every_parameter(vector, architecture, latent):
    spec = VECTORS[vector]
    model = build_model(model_config(architecture=architecture, latent=latent, latent_dim=3, embed_dim=16), spec)
    x = torch.randn(4, spec.features)
    output = model.train()(x)
    assert output.logits.shape == output.x_hat.shape == (4, spec.features)
    assert output.latent.code.shape == (4, 3)
    assert model.input_shape == spec.shape and model.spec == spec
    assert_every_parameter_trains(model, output.logits)


@pytest.mark.parametrize("architecture", ["dense", "attention"])
def test_real_values_are_not_squashed_and_each_categorical_group_is_a_distribution(architecture):
    model = build_model(model_config(architecture=architecture, embed_dim=16), TABLE).eval()
    output = model(table_rows(8))
    numeric = [0, 1, 5]
    assert torch.equal(output.x_hat[:, numeric], output.logits[:, numeric])
    assert torch.allclose(output.x_hat[:, 2:5].sum(dim=1), torch.ones(8))
    # and with logits far outside [0, 1]: numeric values stay as they are
    logits = torch.tensor([[-7.0, 9.0, 1.0, 2.0, 3.0, 4.5]])
    x_hat = Output(logits, LatentOutput(z=torch.zeros(1, 2), code=torch.zeros(1, 2)), TABLE).x_hat
    assert x_hat[0, numeric].tolist() == [-7.0, 9.0, 4.5]
    assert torch.allclose(x_hat[0, 2:5], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), dim=0))
    unit = Output(logits, LatentOutput(z=torch.zeros(1, 2), code=torch.zeros(1, 2)), DIGITS).x_hat
    assert torch.equal(unit, torch.sigmoid(logits))


def test_the_attention_decoder_puts_each_columns_outputs_at_its_positions():
    model = build_model(model_config(architecture="attention", embed_dim=16), TABLE)
    with torch.no_grad():  # outputs from the biases alone: numeric a, b, d; then c's three levels
        model.decoder.numeric.weight.zero_()
        model.decoder.numeric.bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
        model.decoder.categorical[0].weight.zero_()
        model.decoder.categorical[0].bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert model.decode(torch.randn(2, 16)).tolist() == [[10.0, 20.0, 1.0, 2.0, 3.0, 30.0]] * 2


def test_gaussian_latent_samples_in_training_and_uses_the_mean_otherwise():
    model = build_model(model_config(latent="gaussian", hidden_dims=[16]), DIGITS)
    x = torch.rand(2, 1, 8, 8)
    model.train()
    a, b = model.encode(x), model.encode(x)
    assert not torch.equal(a.z, b.z) and torch.equal(a.mu, b.mu)
    # the reparameterisation: z = mu + eps * sigma, with gradients reaching mu and logvar
    assert a.z.requires_grad and a.z.grad_fn is not None
    model.eval()
    assert torch.equal(model.encode(x).z, model.encode(x).mu)


def test_reparameterised_samples_have_the_encoded_moments():
    model = build_model(model_config(latent="gaussian", hidden_dims=[], latent_dim=2), DIGITS)
    x = torch.rand(1, 1, 8, 8).expand(20_000, -1, -1, -1)
    latent = model.encode(x, sample=True)
    sigma = torch.exp(0.5 * latent.logvar[0])
    assert torch.allclose(latent.z.mean(0), latent.mu[0], atol=4 * sigma.max().item() / 100)
    assert torch.allclose(latent.z.std(0), sigma, rtol=0.03)


def test_dense_depth_and_widths_are_configurable():
    model = build_model(model_config(hidden_dims=[40, 30, 20], latent_dim=10), DIGITS)
    widths = [m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [40, 30, 20]
    decoder_widths = [m.out_features for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert decoder_widths == [20, 30, 40, 64]


def test_attention_map_is_a_distribution_over_patches():
    model = build_model(model_config(architecture="attention", patch_size=7), IMAGES["mnist"]).eval()
    maps = model.encoder.attention_map(torch.rand(5, 1, 28, 28))
    assert maps.shape == (5, 4, 4)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(5), atol=1e-5)
    assert (maps >= 0).all()


@pytest.mark.parametrize("vector", VECTORS)
def test_attention_map_of_a_vector_has_one_weight_per_column(vector):
    spec = VECTORS[vector]
    model = build_model(model_config(architecture="attention", embed_dim=16), spec).eval()
    maps = model.encoder.attention_map(torch.randn(5, spec.features))
    assert maps.shape == (5, len(spec.columns) or spec.features)  # the table: 4 columns over 6 positions
    assert torch.allclose(maps.sum(dim=1), torch.ones(5), atol=1e-5)
    assert (maps >= 0).all()


def test_an_architecture_says_in_one_line_which_inputs_it_takes():
    assert input_problem(model_config(architecture="conv"), TABLE) == (
        "model.architecture='conv' takes images (channels x height x width); "
        "t.csv is a vector of 6 features: use 'dense' or 'attention'"
    )
    assert input_problem(model_config(architecture="attention", patch_size=3), DIGITS) == (
        "model.patch_size=3 must divide the 8x8 images of digits"
    )
    for architecture in ["dense", "attention"]:  # no patches on vectors: any patch size does
        assert input_problem(model_config(architecture=architecture, patch_size=3), TABLE) is None
    assert input_problem(model_config(architecture="conv"), DIGITS) is None


def test_columns_that_do_not_cover_the_vector_are_refused():
    gap = DataSpec(name="gap.csv", modality=VECTOR, shape=(3,), unit_range=False,
                   columns=(Column("a", NUMERIC, 0), Column("b", NUMERIC, 2)))
    with pytest.raises(ValueError, match="do not cover"):
        build_model(model_config(architecture="attention"), gap)


@pytest.mark.parametrize("architecture", ["dense", "attention"])
def test_vector_models_learn_a_low_rank_table(architecture):
    torch.manual_seed(0)
    spec = DataSpec(name="low_rank.csv", modality=VECTOR, shape=(8,), unit_range=False,
                    columns=tuple(Column(f"x{i}", NUMERIC, i) for i in range(8)))
    rows = torch.randn(128, 2) @ torch.randn(2, 8) + 0.05 * torch.randn(128, 8)  # rank 2, a little noise
    model = build_model(model_config(architecture=architecture, latent_dim=4, hidden_dims=[64],
                                     embed_dim=32, heads=2, depth=1), spec).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = (model(rows).x_hat - rows).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mse = (model.eval()(rows).x_hat - rows).pow(2).mean()
    assert mse < 0.05 * rows.var()


def test_code_activation_bounds_the_code():
    model = build_model(model_config(code_activation="sigmoid", hidden_dims=[8]), DIGITS)
    code = model.encode(torch.randn(50, 1, 8, 8) * 10).code
    assert code.min() >= 0 and code.max() <= 1


def test_parameter_count_grows_with_width():
    small = build_model(model_config(hidden_dims=[16]), DIGITS)
    large = build_model(model_config(hidden_dims=[64]), DIGITS)
    assert parameter_count(large) > parameter_count(small) > 0

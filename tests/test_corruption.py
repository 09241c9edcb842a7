import pytest
import torch

from aesearch.errors import ConfigError
from aesearch.parts.corruption import CORRUPTIONS, corrupt, corruption_problem
from aesearch.parts.data.spec import CATEGORICAL, IMAGE, NUMERIC, VECTOR, Column, DataSpec

IMAGES = DataSpec("digits", IMAGE, (1, 50, 50), unit_range=True)
REAL = DataSpec("features.npy", VECTOR, (1,), unit_range=False)
LEVELS = ("red", "white", "rose", "orange")
# alcohol (numeric, values in [0, 1)), colour (one-hot over 4 levels), acidity (numeric, in [10, 11))
TABLE = DataSpec("wine.csv", VECTOR, (6,), unit_range=False, columns=(
    Column("alcohol", NUMERIC, 0),
    Column("colour", CATEGORICAL, 1, levels=LEVELS),
    Column("acidity", NUMERIC, 5),
))
COLOUR = slice(1, 5)


@pytest.fixture
def image_batch():
    torch.manual_seed(0)
    return torch.rand(200, 1, 50, 50) * 0.8 + 0.1  # values strictly inside (0, 1)


@pytest.fixture
def table_batch():
    generator = torch.Generator().manual_seed(0)
    rows = 4000
    colour = torch.nn.functional.one_hot(torch.randint(0, len(LEVELS), (rows,), generator=generator), len(LEVELS))
    alcohol, acidity = torch.rand(rows, 1, generator=generator), 10 + torch.rand(rows, 1, generator=generator)
    return torch.cat([alcohol, colour.float(), acidity], dim=1)


def test_none_returns_the_input_itself(image_batch):
    assert corrupt(image_batch, "none", None, None, IMAGES) is image_batch


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_salt_pepper_rates(image_batch, p):
    noisy = corrupt(image_batch, "salt_pepper", p, None, IMAGES)
    n = image_batch.numel()
    assert (noisy == 0).sum().item() / n == pytest.approx(p / 2, abs=0.005)
    assert (noisy == 1).sum().item() / n == pytest.approx(p / 2, abs=0.005)
    untouched = (noisy == image_batch).float().mean().item()
    assert untouched == pytest.approx(1 - p, abs=0.005)


def test_salt_pepper_is_refused_on_real_valued_data_and_allowed_on_unit_range():
    problem = corruption_problem("salt_pepper", TABLE)
    assert problem.startswith("corruption.kind='salt_pepper' needs values in [0, 1]")
    assert "wine.csv is real-valued" in problem and "\n" not in problem
    assert corruption_problem("salt_pepper", IMAGES) is None
    assert all(corruption_problem(kind, TABLE) is None for kind in CORRUPTIONS.names() if kind != "salt_pepper")
    with pytest.raises(ConfigError, match="salt_pepper"):
        corrupt(torch.randn(8, 6), "salt_pepper", 0.2, None, TABLE)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_masking_zeroes_with_probability_p(image_batch, p):
    noisy = corrupt(image_batch, "masking", p, None, IMAGES)
    assert (noisy == 0).float().mean().item() == pytest.approx(p, abs=0.005)
    kept = noisy != 0
    assert torch.equal(noisy[kept], image_batch[kept])


def test_masking_zeroes_a_categorical_group_as_a_whole(table_batch):
    noisy = corrupt(table_batch, "masking", 0.3, torch.Generator().manual_seed(1), TABLE)
    group, original = noisy[:, COLOUR], table_batch[:, COLOUR]
    zeroed = (group == 0).all(1)
    assert torch.equal(group[~zeroed], original[~zeroed])  # a group is zeroed whole or kept whole
    assert zeroed.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert (noisy[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("p", [0.15, 0.5])
def test_swap_noise_replaces_columns_with_the_same_column_of_other_rows(table_batch, p):
    noisy = corrupt(table_batch, "swap", p, torch.Generator().manual_seed(2), TABLE)
    for position in (0, 5):  # numeric values are distinct: a changed value was swapped in
        changed = noisy[:, position] != table_batch[:, position]
        assert changed.float().mean().item() == pytest.approx(p, abs=0.03)
        assert torch.isin(noisy[changed, position], table_batch[:, position]).all()  # from this column
    group = noisy[:, COLOUR]
    assert torch.equal(group.sum(1), torch.ones(len(group))) and ((group == 0) | (group == 1)).all()  # one-hot
    # a swapped group takes another row's level: different with probability 1 - sum q_l^2 = 3/4
    changed = (group != table_batch[:, COLOUR]).any(1).float().mean().item()
    assert changed == pytest.approx(p * 3 / 4, abs=0.03)


def test_swap_noise_takes_each_pixel_from_another_image(image_batch):
    noisy = corrupt(image_batch, "swap", 0.3, torch.Generator().manual_seed(3), IMAGES)
    changed = noisy != image_batch
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.005)
    values, positions = noisy.flatten(1), changed.flatten(1).nonzero()
    column = image_batch.flatten(1)[:, positions[:20, 1]]  # each changed pixel's column across the batch
    assert (column == values[positions[:20, 0], positions[:20, 1]]).any(0).all()


def test_gaussian_noise_has_sigma():
    x = torch.full((100_000,), 0.5)
    noisy = corrupt(x, "gaussian", 0.1, None, IMAGES)
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.02)
    assert (noisy - x).mean().item() == pytest.approx(0.0, abs=0.002)


def test_additive_noise_is_clipped_to_the_image_range(image_batch):
    for kind in ("gaussian", "uniform"):
        noisy = corrupt(image_batch, kind, 2.0, None, IMAGES)
        assert noisy.min() >= 0 and noisy.max() <= 1


def test_additive_noise_is_not_clipped_on_real_valued_data():
    x = torch.full((10_000, 1), 0.5)
    for kind in ("gaussian", "uniform"):
        noise = corrupt(x, kind, 2.0, torch.Generator().manual_seed(4), REAL) - x
        assert noise.min() < -1 and noise.max() > 1
        assert noise.mean().item() == pytest.approx(0.0, abs=0.05)


def test_uniform_noise_is_bounded_by_a():
    x = torch.full((100_000,), 0.5)
    noise = corrupt(x, "uniform", 0.2, None, IMAGES) - x
    assert noise.abs().max().item() <= 0.2 + 1e-6
    assert noise.var().item() == pytest.approx(0.2**2 / 3, rel=0.03)  # Var U(-a, a) = a^2 / 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_corruption_stays_on_device_and_dtype(image_batch, dtype):
    """Noise drawn as float32 and added would turn a bf16 batch into float32 (and a float64 one stays wide only
    by luck): every kind keeps the batch's own dtype and device, and changes values unless it is `none`."""
    batch = image_batch.to(dtype)
    for kind in CORRUPTIONS.names():
        noisy = corrupt(batch, kind, None if kind == "none" else 0.3, torch.Generator().manual_seed(0), IMAGES)
        assert (noisy.shape, noisy.dtype, noisy.device) == (batch.shape, dtype, batch.device), kind
        assert torch.equal(noisy, batch) == (kind == "none"), kind

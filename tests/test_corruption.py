import pytest
import torch

from aesearch.parts.corruption import CORRUPTIONS, corrupt


@pytest.fixture
def image_batch():
    torch.manual_seed(0)
    return torch.rand(200, 1, 50, 50) * 0.8 + 0.1  # values strictly inside (0, 1)


def test_none_returns_the_input_itself(image_batch):
    assert corrupt(image_batch, "none", None) is image_batch


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_salt_pepper_rates(image_batch, p):
    noisy = corrupt(image_batch, "salt_pepper", p)
    n = image_batch.numel()
    assert (noisy == 0).sum().item() / n == pytest.approx(p / 2, abs=0.005)
    assert (noisy == 1).sum().item() / n == pytest.approx(p / 2, abs=0.005)
    untouched = (noisy == image_batch).float().mean().item()
    assert untouched == pytest.approx(1 - p, abs=0.005)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_masking_zeroes_with_probability_p(image_batch, p):
    noisy = corrupt(image_batch, "masking", p)
    assert (noisy == 0).float().mean().item() == pytest.approx(p, abs=0.005)
    kept = noisy != 0
    assert torch.equal(noisy[kept], image_batch[kept])


def test_gaussian_noise_has_sigma():
    x = torch.full((100_000,), 0.5)
    noisy = corrupt(x, "gaussian", 0.1)
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.02)
    assert (noisy - x).mean().item() == pytest.approx(0.0, abs=0.002)


def test_additive_noise_is_clipped_to_the_image_range(image_batch):
    for kind in ("gaussian", "uniform"):
        noisy = corrupt(image_batch, kind, 2.0)
        assert noisy.min() >= 0 and noisy.max() <= 1


def test_uniform_noise_is_bounded_by_a():
    x = torch.full((100_000,), 0.5)
    noise = corrupt(x, "uniform", 0.2) - x
    assert noise.abs().max().item() <= 0.2 + 1e-6
    assert noise.var().item() == pytest.approx(0.2**2 / 3, rel=0.03)  # Var U(-a, a) = a^2 / 3


def test_corruption_stays_on_device_and_dtype(image_batch):
    for kind in CORRUPTIONS.names():
        noisy = corrupt(image_batch, kind, None if kind == "none" else 0.3)
        assert noisy.shape == image_batch.shape and noisy.dtype == image_batch.dtype

"""Pictures of what a model does, as PNG-ready image grids (torchvision.utils).

- reconstructions: rows of originals | corrupted inputs | reconstructions;
- prior samples: decodes of z ~ N(0, I), for gaussian latents;
- attention: for attention encoders, each image above the map of where its code was read from;
- and the figures of `figures` (latent map, per-feature errors, anomaly scores), for vectors too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aesearch.parts.corruption import corrupt

if TYPE_CHECKING:
    from aesearch.config import TrainConfig
    from aesearch.parts.data import Data
    from aesearch.parts.models import Autoencoder


PICTURES_SEED = 0  # the noise and prior samples of the pictures: never torch's global random state


def pictures_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(PICTURES_SEED)


def _grid(images: torch.Tensor, per_row: int) -> torch.Tensor:
    # Imported here, not at the top: importing torchvision costs seconds (it loads torch._dynamo).
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=per_row, padding=1, pad_value=0.5)


@torch.no_grad()
def reconstruction_grid(model: Autoencoder, x: torch.Tensor, kind: str, level: float | None) -> torch.Tensor:
    """Three rows: originals, the encoder's (corrupted) inputs, reconstructions from them. The same
    noise at every epoch (drawn from a generator of its own), so that epochs compare."""
    model.eval()
    noisy = corrupt(x, kind, level, pictures_generator(x.device), model.spec)
    x_hat = model(noisy, sample=False).x_hat
    return _grid(torch.cat([x, noisy, x_hat.to(x.dtype)]), len(x))


@torch.no_grad()
def prior_sample_grid(model: Autoencoder, count: int) -> torch.Tensor:
    """Decodes of z ~ N(0, I): what the generative model has learnt."""
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn(count, model.latent_dim, device=device, generator=pictures_generator(device))
    return _grid(model.spec.values(model.decode(z)), max(1, round(count**0.5)))


@torch.no_grad()
def attention_grid(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Two rows: the images, and their pooling attention (per image, least attended patch
    black, most attended white)."""
    model.eval()
    maps = model.encoder.attention_map(x).unsqueeze(1).float()  # (batch, 1, grid_h, grid_w)
    low = maps.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = maps.flatten(1).amax(1).view(-1, 1, 1, 1)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest").expand(-1, x.shape[1], -1, -1)
    return _grid(torch.cat([x.float(), maps]), len(x))


def image_grids(model: Autoencoder, x: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Every picture that applies to this model, by file name."""
    sample = x[: config.evaluation.image_count]
    grids = {"reconstructions.png": reconstruction_grid(model, sample, config.corruption.kind, config.corruption.level)}
    if model.stochastic:
        grids["prior_samples.png"] = prior_sample_grid(model, config.evaluation.image_count**2)
    if hasattr(model.encoder, "attention_map"):
        grids["attention.png"] = attention_grid(model, sample)
    return grids


def save_pictures(model: Autoencoder, data: Data, config: TrainConfig, folder: Path | str) -> list[Path]:
    """Write the pictures of a trained model on the test split into `folder` as PNG files: the image
    grids (for images) and the figures (`figures.save_figures`: latent map, errors, anomalies)."""
    from torchvision.utils import save_image

    from aesearch.parts.data import IMAGE
    from aesearch.training.figures import save_figures

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    data = data.to(device)
    paths = []
    if data.spec.modality == IMAGE:
        for name, grid in image_grids(model, data.test_x, config).items():
            save_image(grid, folder / name)
            paths.append(folder / name)
    return paths + save_figures(model, data, folder, config.evaluation)

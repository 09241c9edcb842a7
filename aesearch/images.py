"""Pictures of what a model does, as PNG-ready image grids (torchvision.utils).

- reconstructions: rows of originals | corrupted inputs | reconstructions;
- prior samples: decodes of z ~ N(0, I), for gaussian latents;
- attention: for attention encoders, each image above the map of where its code was read from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aesearch.corruption import corrupt

if TYPE_CHECKING:
    from aesearch.config import TrainConfig
    from aesearch.models import Autoencoder


def _grid(images: torch.Tensor, per_row: int) -> torch.Tensor:
    # Imported here, not at the top: importing torchvision costs seconds (it loads torch._dynamo).
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=per_row, padding=1, pad_value=0.5)


@torch.no_grad()
def reconstruction_grid(model: Autoencoder, x: torch.Tensor, kind: str, level: float | None) -> torch.Tensor:
    """Three rows: originals, the encoder's (corrupted) inputs, reconstructions from them."""
    model.eval()
    noisy = corrupt(x, kind, level)
    x_hat = model(noisy, sample=False).x_hat
    return _grid(torch.cat([x, noisy, x_hat.to(x.dtype)]), len(x))


@torch.no_grad()
def prior_sample_grid(model: Autoencoder, count: int) -> torch.Tensor:
    """Decodes of z ~ N(0, I): what the generative model has learnt."""
    model.eval()
    z = torch.randn(count, model.latent_dim, device=next(model.parameters()).device)
    return _grid(torch.sigmoid(model.decode(z)), max(1, round(count**0.5)))


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


def save_images(model: Autoencoder, x: torch.Tensor, config: TrainConfig, folder: Path | str) -> list[Path]:
    """Write `image_grids` as PNG files into `folder`; returns their paths."""
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in image_grids(model, x, config).items():
        save_image(grid, folder / name)
        paths.append(folder / name)
    return paths

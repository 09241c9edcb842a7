"""Pictures of what a model does, as PNG-ready image grids (torchvision.utils).

- reconstructions: rows of originals | corrupted inputs | reconstructions;
- prior samples: decodes of z ~ N(0, I), for gaussian latents;
- attention: for attention encoders, each image above the map of where its code was read from;
- latent plot: the test set's codes in 2-D (PCA when the code is wider), coloured by class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aesearch.parts.corruption import corrupt

if TYPE_CHECKING:
    from aesearch.config import TrainConfig
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
    noisy = corrupt(x, kind, level, generator=pictures_generator(x.device))
    x_hat = model(noisy, sample=False).x_hat
    return _grid(torch.cat([x, noisy, x_hat.to(x.dtype)]), len(x))


@torch.no_grad()
def prior_sample_grid(model: Autoencoder, count: int) -> torch.Tensor:
    """Decodes of z ~ N(0, I): what the generative model has learnt."""
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn(count, model.latent_dim, device=device, generator=pictures_generator(device))
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


@torch.no_grad()
def latent_plot(model: Autoencoder, x: torch.Tensor, labels: torch.Tensor, path: Path | str, limit: int = 2000) -> None:
    """Scatter the codes of (up to `limit`) images in 2-D, one colour per class, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    codes = model.encode(x[:limit], sample=False).code.float().cpu()
    if codes.shape[1] > 2:  # the two directions of largest variance
        centred = codes - codes.mean(0)
        codes = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
    elif codes.shape[1] == 1:
        codes = torch.cat([codes, torch.zeros_like(codes)], 1)
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    points = axes.scatter(codes[:, 0], codes[:, 1], c=labels[:limit].cpu(), cmap="tab10", s=4)
    figure.colorbar(points, ax=axes, label="class")
    axes.set_title(f"latent codes ({model.latent_dim}-D{', PCA' if model.latent_dim > 2 else ''})")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_images(
    model: Autoencoder, x: torch.Tensor, config: TrainConfig, folder: Path | str, labels: torch.Tensor | None = None
) -> list[Path]:
    """Write `image_grids` (and, given labels, the latent plot) as PNG files into `folder`."""
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in image_grids(model, x, config).items():
        save_image(grid, folder / name)
        paths.append(folder / name)
    if labels is not None:
        latent_plot(model, x, labels, folder / "latent.png")
        paths.append(folder / "latent.png")
    return paths

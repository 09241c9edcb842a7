"""The attention architecture: tokens -> transformer -> attention pooling -> code, and back.

Images are cut into patches, one token each (as a ViT). Vectors are read as the FT-Transformer
reads tables (Gorishniy et al. 2021, "Revisiting Deep Learning Models for Tabular Data"): one
token per column, a numeric value through its own affine map, a categorical one-hot group through
its own linear map. Both encoders end in one learned query attending over the tokens, whose
weights say where the code was read from (`attention_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from aesearch.parts.data.spec import CATEGORICAL, NUMERIC, Column, DataSpec
from aesearch.parts.models.config import ModelConfig


def _transformer(config: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        config.embed_dim,
        config.heads,
        dim_feedforward=config.mlp_ratio * config.embed_dim,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)


class _PooledEncoder(nn.Module):
    """Tokens -> transformer -> one learned query attends over the tokens (attention pooling).

    A subclass makes its token parameters, then calls `_add_pooling`; it says how an input becomes
    tokens (`tokens`) and how the pooling weights are laid out for a reader (`arrange`).
    """

    def _add_pooling(self, config: ModelConfig) -> None:
        """After the tokens' parameters: the order in which seeded initial weights are drawn."""
        self.blocks = _transformer(config)
        self.query = nn.Parameter(torch.randn(1, 1, config.embed_dim) * 0.02)
        self.pool = nn.MultiheadAttention(config.embed_dim, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.out_features = config.embed_dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, embed_dim)
        raise NotImplementedError

    def arrange(self, weights: torch.Tensor) -> torch.Tensor:  # (batch, tokens) -> the reader's layout
        raise NotImplementedError

    def _pool(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.blocks(self.tokens(x))
        query = self.query.expand(x.shape[0], -1, -1)
        pooled, weights = self.pool(query, tokens, tokens, need_weights=need_weights)
        return self.norm(pooled[:, 0]), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x, need_weights=False)[0]

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling attention over the tokens, averaged over heads, laid out by `arrange`; each
        sample's weights sum to 1."""
        _, weights = self._pool(x, need_weights=True)
        return self.arrange(weights[:, 0])


class _TokenDecoder(nn.Module):
    """Code -> one token per output slot (+ learned position) -> transformer. A subclass makes
    these parameters with `_add_tokens`, then its read-out of the tokens."""

    def _add_tokens(self, config: ModelConfig, count: int) -> None:
        self.expand = nn.Linear(config.latent_dim, count * config.embed_dim)
        self.position = nn.Parameter(torch.randn(1, count, config.embed_dim) * 0.02)
        self.blocks = _transformer(config)
        self.norm = nn.LayerNorm(config.embed_dim)

    def _tokens(self, z: torch.Tensor) -> torch.Tensor:
        tokens = self.expand(z).view(z.shape[0], self.position.shape[1], -1) + self.position
        return self.norm(self.blocks(tokens))


# --- images: patches --------------------------------------------------------------------------


def patches_problem(config: ModelConfig, spec: DataSpec) -> str | None:
    _, height, width = spec.shape
    if height % config.patch_size or width % config.patch_size:
        return f"model.patch_size={config.patch_size} must divide the {height}x{width} images of {spec.name}"
    return None


class AttentionEncoder(_PooledEncoder):
    """Images: one token per patch (+ learned position); `attention_map` is (batch, grid_h, grid_w),
    to be rendered as an image."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        channels, height, width = spec.shape
        self.grid = (height // config.patch_size, width // config.patch_size)
        self.patches = nn.Conv2d(channels, config.embed_dim, config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], config.embed_dim) * 0.02)
        self._add_pooling(config)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patches(x).flatten(2).transpose(1, 2) + self.position

    def arrange(self, weights: torch.Tensor) -> torch.Tensor:
        return weights.reshape(weights.shape[0], *self.grid)


class AttentionDecoder(_TokenDecoder):
    """Code -> one token per patch -> the pixels of each patch."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        shape = tuple(spec.shape)
        self.shape, self.patch = shape, config.patch_size
        self.grid = (shape[1] // config.patch_size, shape[2] // config.patch_size)
        self._add_tokens(config, self.grid[0] * self.grid[1])
        self.to_pixels = nn.Linear(config.embed_dim, shape[0] * config.patch_size**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, (channels, height, width), p, (gh, gw) = z.shape[0], self.shape, self.patch, self.grid
        pixels = self.to_pixels(self._tokens(z))  # (batch, patches, channels * p * p)
        pixels = pixels.view(batch, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return pixels.reshape(batch, channels, height, width)


# --- vectors: one token per column ------------------------------------------------------------


def _argsort(values: list[int]) -> list[int]:
    return sorted(range(len(values)), key=values.__getitem__)


@dataclass(frozen=True)
class _Layout:
    """A vector's columns as tokens: the numeric columns first (embedded and read all at once),
    then the categorical ones. A vector without columns (a feature matrix) is all numeric."""

    numeric: list[int]  # the numeric values' positions in the input
    categorical: list[slice]  # each categorical column's one-hot group
    order: list[int]  # for each column, in the spec's order, its token
    inverse: list[int]  # for each input position, its index in the concatenated outputs

    @classmethod
    def of(cls, spec: DataSpec) -> _Layout:
        columns = spec.columns or tuple(Column(str(i), NUMERIC, i) for i in range(spec.features))
        grouped = sorted(range(len(columns)), key=lambda i: columns[i].kind != NUMERIC)  # stable
        outputs = [p for i in grouped for p in range(columns[i].positions.start, columns[i].positions.stop)]
        if sorted(outputs) != list(range(spec.features)):
            raise ValueError(f"the columns of {spec.name} do not cover its {spec.features} features once each")
        return cls(
            numeric=[c.start for c in columns if c.kind == NUMERIC],
            categorical=[c.positions for c in columns if c.kind == CATEGORICAL],
            order=_argsort(grouped),
            inverse=_argsort(outputs),
        )


class _NumericTokens(nn.Module):
    """Each numeric column's own affine map, value -> token, all at once: v_j * W_j + b_j."""

    def __init__(self, columns: int, embed_dim: int):
        super().__init__()
        bound = embed_dim**-0.5  # the FT-Transformer's initialisation
        self.weight = nn.Parameter(torch.empty(columns, embed_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(columns, embed_dim).uniform_(-bound, bound))

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # (batch, columns) -> (batch, columns, embed_dim)
        return values.unsqueeze(-1) * self.weight + self.bias


class _NumericValues(nn.Module):
    """Each numeric column's own affine map, token -> value, all at once: <t_j, W_j> + b_j."""

    def __init__(self, columns: int, embed_dim: int):
        super().__init__()
        bound = embed_dim**-0.5  # as nn.Linear(embed_dim, 1)
        self.weight = nn.Parameter(torch.empty(columns, embed_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(columns).uniform_(-bound, bound))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, columns, embed_dim) -> (batch, columns)
        return (tokens * self.weight).sum(-1) + self.bias


class ColumnEncoder(_PooledEncoder):
    """Vectors: one token per column. No positions: each column has its own embedding already.
    `attention_map` is (batch, columns), in the columns' order."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        self.layout = _Layout.of(spec)
        self.numeric = _NumericTokens(len(self.layout.numeric), config.embed_dim)
        self.categorical = nn.ModuleList(
            nn.Linear(group.stop - group.start, config.embed_dim) for group in self.layout.categorical
        )
        self._add_pooling(config)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        numeric = self.numeric(x[:, self.layout.numeric])
        groups = zip(self.categorical, self.layout.categorical)
        categorical = [embed(x[:, group]).unsqueeze(1) for embed, group in groups]
        return torch.cat([numeric, *categorical], dim=1)

    def arrange(self, weights: torch.Tensor) -> torch.Tensor:
        return weights[:, self.layout.order]


class ColumnDecoder(_TokenDecoder):
    """Code -> one token per column -> each column's logits (one for a numeric column, one per
    level for a categorical one), put back at the column's positions: (batch, features)."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        self.layout = _Layout.of(spec)
        self._add_tokens(config, len(self.layout.numeric) + len(self.layout.categorical))
        self.numeric = _NumericValues(len(self.layout.numeric), config.embed_dim)
        self.categorical = nn.ModuleList(
            nn.Linear(config.embed_dim, group.stop - group.start) for group in self.layout.categorical
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tokens, count = self._tokens(z), len(self.layout.numeric)  # numeric columns' tokens first
        numeric = self.numeric(tokens[:, :count])
        categorical = [read(tokens[:, count + i]) for i, read in enumerate(self.categorical)]
        return torch.cat([numeric, *categorical], dim=1)[:, self.layout.inverse]

"""foveal.layers: nn.Modules built on foveal.kernels (attention layers, positional terms, padding)."""
from .mlp import RecomputeMlp
from .neighborhood import NeighborhoodAttention2d

__all__ = ["NeighborhoodAttention2d", "RecomputeMlp"]

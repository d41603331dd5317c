"""foveal.layers: nn.Modules built on foveal.kernels (attention layers, positional terms, padding, norms)."""
from .agent import AgentAttention, compose_agent_bias
from .halo import HaloAttention2d
from .mlp import RecomputeMlp
from .neighborhood import NeighborhoodAttention2d
from .norm import AddLayerNorm
from .routing import AttentionLePE, BiLevelRoutingAttention

__all__ = ["AddLayerNorm", "HaloAttention2d", "NeighborhoodAttention2d", "RecomputeMlp", "AttentionLePE", "BiLevelRoutingAttention",
           "AgentAttention", "compose_agent_bias"]

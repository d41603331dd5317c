"""foveal.kernels: attention operators (neighborhood, halo) and the fused add + LayerNorm, as torch custom ops
(Triton kernels + a PyTorch reference)."""
from .agent import AGENT_BACKENDS, agent_attention
from .backends import BACKEND_ENV, Backend, BackendRegistry
from .halo import HALO_BACKENDS, halo2d
from .na_block import NABlockConfig, na_block
from .neighborhood import NA_BACKENDS, na1d, na2d, na3d, neighborhood_attention
from .norm import NORM_BACKENDS, add_layer_norm, add_layer_norm_linear
from .routing import ROUTING_BACKENDS, routed_attention

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "NA_BACKENDS", "na_block", "NABlockConfig", "halo2d", "HALO_BACKENDS",
           "add_layer_norm", "add_layer_norm_linear", "NORM_BACKENDS", "Backend", "BackendRegistry", "BACKEND_ENV",
           "routed_attention", "ROUTING_BACKENDS", "agent_attention", "AGENT_BACKENDS"]

"""foveal.kernels: attention operators as torch custom ops (Triton kernels + a PyTorch reference)."""
from .backends import BACKEND_ENV, Backend, BackendRegistry
from .neighborhood import NA_BACKENDS, na1d, na2d, na3d, neighborhood_attention

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "NA_BACKENDS", "Backend", "BackendRegistry", "BACKEND_ENV"]

"""foveal: local- and sparse-attention vision backbones; importing it registers them in timm."""
from . import kernels, layers
from . import halonet  # noqa: F401  (registers the H family)
from .agent_deit import AgentDeiT
from .agent_pvt import AgentPVT
from .agent_swin import AgentSwinTransformer
from .biformer import BiFormer
from .agent_cswin import AgentCSWin
from .accelerate import accelerate
from .nat import NAT, NATIsotropic

__version__ = "0.1.0"

"""Agent attention (Agent-Swin / Agent-PVT / Agent-DeiT; SPEC section 4) and its position biases.

:class:`AgentAttention` is the global agent attention of the released models: q, k, v from Linear
layers with bias (one ``qkv`` Linear, or ``q`` and ``kv`` as in Agent-PVT), agents = adaptive average
pool of the projected q over the token map, two position biases per head, a 3x3 depthwise conv of v
added to the output, and the output Linear. Agent-DeiT's variant (``cls_token=True``) carries a
class token in front of the map: the agents pool the patch tokens only, ``ac_bias`` / ``ca_bias``
are the agent <- cls and cls <- agent biases, and the conv skips the class token.

:func:`compose_agent_bias` turns the small bias tables into the two biases the op takes, once per
call and broadcast over the batch (the official code ``.repeat``\\ s them per batch element): the
7x7 block tables resized bilinearly (``align_corners=False``) to the map, plus the row / column
tables resized to the map when it differs from the one they were trained on, and (dense tasks) a
second bilinear resize over the agent grid when more agents are pooled than the tables hold.

The attention itself is :func:`foveal.kernels.agent_attention` on strided views of the projections;
TorchScript takes an explicit SDPA path with the same result.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import trunc_normal_

from foveal.kernels import agent_attention

__all__ = ["AgentAttention", "AgentTablesMixin", "compose_agent_bias", "squeeze_agent_tables", "AGENT_TABLE_NAMES"]

# The row / column bias tables. The release files hold them with a leading singleton dim (5-D), which
# `Module.to(memory_format=torch.channels_last)` rejects (it converts every 5-D tensor and needs
# channels_last_3d there); the modules keep them 4-D and read either layout.
AGENT_TABLE_NAMES = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")


def _is_release_table(key: str, value) -> bool:
    return (isinstance(value, Tensor) and value.dim() == 5 and value.shape[0] == 1
            and key.rsplit(".", 1)[-1] in AGENT_TABLE_NAMES)


def squeeze_agent_tables(state_dict):
    """A state dict with its 5-D release-layout row / column tables (``[1, H, ...]``) in the modules' 4-D layout."""
    return {k: v[0] if _is_release_table(k, v) else v for k, v in state_dict.items()}


class AgentTablesMixin:
    """``load_state_dict`` of a module holding the row / column tables accepts their release (5-D) layout too."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in AGENT_TABLE_NAMES:
            key = prefix + name
            if _is_release_table(key, state_dict.get(key)):
                state_dict[key] = state_dict[key][0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _table(t: Tensor) -> Tensor:
    """A row / column table in the 4-D layout (a 5-D release-layout one loses its leading singleton dim)."""
    return t[0] if t.dim() == 5 else t


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"AgentAttention: {name} must be an int >= 1 or a pair of them, got {name}={value!r}")
    return value


def _agent_side(agent_num: int) -> int:
    side = int(round(agent_num ** 0.5))
    if isinstance(agent_num, bool) or not isinstance(agent_num, int) or agent_num < 1 or side * side != agent_num:
        raise ValueError(f"AgentAttention: agent_num must be a perfect square >= 1 (agents pool a square grid), "
                         f"got agent_num={agent_num!r}")
    return side


def _resize(t: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of the last two dims of ``[A, B, h, w]``; same size is a no-op."""
    if t.shape[-2] == size[0] and t.shape[-1] == size[1]:
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _resize_agents(t: Tensor, side: int, agent_shape: Tuple[int, int]) -> Tensor:
    """``[H, side * side, L]`` -> ``[H, P * Q, L]``: bilinear resize over the agent grid."""
    heads, _, length = t.shape
    t = t.reshape(heads, side, side, length).permute(0, 3, 1, 2)  # H, L, side, side
    t = F.interpolate(t, size=agent_shape, mode="bilinear", align_corners=False)
    return t.flatten(2).transpose(1, 2)  # H, P * Q, L


def compose_agent_bias(
        an_bias: Tensor,
        na_bias: Tensor,
        ah_bias: Tensor,
        aw_bias: Tensor,
        ha_bias: Tensor,
        wa_bias: Tensor,
        size: Tuple[int, int],
        agent_shape: Optional[Tuple[int, int]] = None,
        ac_bias: Optional[Tensor] = None,
        ca_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The agent <- key and query <- agent biases of one window, broadcast over the batch.

    Args:
        an_bias: Agent <- key block table ``[H, n, 7, 7]`` (any block size).
        na_bias: Query <- agent block table ``[H, n, 7, 7]``.
        ah_bias: Agent <- key row table ``[H, n, h0, 1]`` (the release files' ``[1, H, n, h0, 1]`` too).
        aw_bias: Agent <- key column table ``[H, n, 1, w0]`` (or ``[1, H, n, 1, w0]``).
        ha_bias: Query <- agent row table ``[H, h0, 1, n]`` (or ``[1, H, h0, 1, n]``).
        wa_bias: Query <- agent column table ``[H, 1, w0, n]`` (or ``[1, H, 1, w0, n]``).
        size: ``(h, w)`` of the window the tokens fill (row-major); the block tables are resized to
            it, the row / column tables too where ``h != h0`` or ``w != w0``.
        agent_shape: ``(P, Q)`` grid of the pooled agents when it differs from the tables'
            ``sqrt(n) x sqrt(n)`` grid (dense tasks); the biases are then resized over the agent grid.
        ac_bias: Agent <- class-token table ``[1, H, n, 1]`` (Agent-DeiT): a first key column.
        ca_bias: Class-token <- agent table ``[1, H, 1, n]`` (Agent-DeiT): a first query row.

    Returns:
        ``bias_ak [H, M, T]`` and ``bias_qa [H, T, M]`` (``M = P * Q`` or ``n``; ``T = h * w``, plus one
        with the class token), contiguous, in the tables' dtype: the ``bias_ak`` / ``bias_qa`` of
        :func:`foveal.kernels.agent_attention`.
    """
    heads, n = an_bias.shape[0], an_bias.shape[1]
    h, w = size[0], size[1]
    ak = _resize(an_bias, (h, w)) + _resize(_table(ah_bias), (h, 1)) + _resize(_table(aw_bias), (1, w))  # H, n, h, w
    qa = (_resize(na_bias, (h, w)) + _resize(_table(ha_bias).permute(0, 3, 1, 2), (h, 1))
          + _resize(_table(wa_bias).permute(0, 3, 1, 2), (1, w)))  # H, n, h, w
    ak = ak.reshape(heads, n, h * w)
    qa = qa.reshape(heads, n, h * w)
    if ac_bias is not None:
        ak = torch.cat([ac_bias[0], ak], dim=-1)  # the class token is key 0
    if ca_bias is not None:
        qa = torch.cat([ca_bias[0].transpose(1, 2), qa], dim=-1)  # and query 0
    if agent_shape is not None:
        side = int(round(n ** 0.5))
        if agent_shape[0] != side or agent_shape[1] != side:
            ak = _resize_agents(ak, side, agent_shape)
            qa = _resize_agents(qa, side, agent_shape)
    return ak.contiguous(), qa.transpose(1, 2).contiguous()


def _explicit_agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, bias_ak: Tensor, bias_qa: Tensor,
                              scale: float) -> Tensor:
    """The op's contract in two SDPA calls with float masks broadcast over the batch (TorchScript path)."""
    q, k, v, agents = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), agents.transpose(1, 2)  # B, H, *, D
    agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias_ak.to(q.dtype), scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=bias_qa.to(q.dtype), scale=scale)
    return out.transpose(1, 2)  # B, N, H, D


class AgentAttention(AgentTablesMixin, nn.Module):
    """Global agent attention over one token map (Agent-Swin "A" blocks, Agent-PVT, Agent-DeiT)."""
    fused_qkv: torch.jit.Final[bool]
    num_prefix_tokens: torch.jit.Final[int]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            agent_num: int = 49,
            window_size: Tuple[int, int] = (14, 14),
            qkv_bias: bool = True,
            fused_qkv: bool = True,
            cls_token: bool = False,
            agent_shape: Optional[Tuple[int, int]] = None,
            proj_drop: float = 0.,
            backend: str = "auto",
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input and output channels.
            num_heads: Number of attention heads; must divide ``dim``.
            agent_num: Agents the bias tables hold (a perfect square: they pool a square grid).
            window_size: Map the row / column tables are sized to (the training map); other maps
                resize them on the fly.
            qkv_bias: Bias in the q, k, v projections.
            fused_qkv: One ``qkv`` Linear (Agent-Swin, Agent-DeiT), else ``q`` and ``kv`` (Agent-PVT).
            cls_token: A class token precedes the map (Agent-DeiT): ``ac_bias`` / ``ca_bias``, agents
                and the depthwise conv on the patch tokens only.
            agent_shape: Grid of pooled agents (dense tasks), e.g. ``(9, 9)`` for 81; default
                ``sqrt(agent_num)`` square. The bias tables are resized over the agent grid.
            proj_drop: Dropout after the output projection.
            backend: Backend passed to :func:`foveal.kernels.agent_attention`.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or isinstance(num_heads, bool) \
                or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"AgentAttention: num_heads must divide dim, got dim={dim!r}, num_heads={num_heads!r}")
        self.agent_side = _agent_side(agent_num)
        self.dim = dim
        self.num_heads = num_heads
        self.agent_num = agent_num
        self.window_size = _pair(window_size, "window_size")
        self.agent_shape = (self.agent_side, self.agent_side) if agent_shape is None else _pair(agent_shape, "agent_shape")
        self.fused_qkv = fused_qkv
        self.cls_token = cls_token
        self.num_prefix_tokens = 1 if cls_token else 0
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend

        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        h0, w0 = self.window_size
        self.an_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.na_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.ah_bias = nn.Parameter(torch.empty(num_heads, agent_num, h0, 1, **dd))
        self.aw_bias = nn.Parameter(torch.empty(num_heads, agent_num, 1, w0, **dd))
        self.ha_bias = nn.Parameter(torch.empty(num_heads, h0, 1, agent_num, **dd))
        self.wa_bias = nn.Parameter(torch.empty(num_heads, 1, w0, agent_num, **dd))
        if cls_token:
            self.ac_bias = nn.Parameter(torch.empty(1, num_heads, agent_num, 1, **dd))
            self.ca_bias = nn.Parameter(torch.empty(1, num_heads, 1, agent_num, **dd))
        else:
            self.register_parameter("ac_bias", None)
            self.register_parameter("ca_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Bias tables: truncated normal, std 0.02 (the Linear layers are initialised by the model)."""
        for t in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias,
                  self.ac_bias, self.ca_bias):
            if t is not None:
                trunc_normal_(t, std=.02)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, "
                f"agent_shape={self.agent_shape}, window_size={self.window_size}, cls_token={self.cls_token}")

    @torch.no_grad()
    def set_window_size(self, window_size: Tuple[int, int]) -> None:
        """Resize the row / column tables to a new training map (as the forward does on the fly)."""
        h, w = _pair(window_size, "window_size")
        if (h, w) == self.window_size:
            return
        self.window_size = (h, w)
        resized = {
            "ah_bias": _resize(self.ah_bias, (h, 1)),
            "aw_bias": _resize(self.aw_bias, (1, w)),
            "ha_bias": _resize(self.ha_bias.permute(0, 3, 1, 2), (h, 1)).permute(0, 2, 3, 1),
            "wa_bias": _resize(self.wa_bias.permute(0, 3, 1, 2), (1, w)).permute(0, 2, 3, 1),
        }
        for name, value in resized.items():
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))

    def set_agent_shape(self, agent_shape: Optional[Tuple[int, int]] = None) -> None:
        """Pool a different agent grid (dense tasks); None restores the tables' own grid."""
        self.agent_shape = (self.agent_side, self.agent_side) if agent_shape is None else _pair(agent_shape, "agent_shape")

    def biases(self, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``bias_ak [H, M, T]`` and ``bias_qa [H, T, M]`` for an ``(h, w)`` map (see :func:`compose_agent_bias`)."""
        return compose_agent_bias(self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias,
                                  size, self.agent_shape, self.ac_bias, self.ca_bias)

    @torch.jit.unused
    def _fused_attn(self, q: Tensor, k: Tensor, v: Tensor, agents: Tensor, bias_ak: Tensor, bias_qa: Tensor) -> Tensor:
        return agent_attention(q, k, v, agents, bias_ak, bias_qa, scale=self.scale, backend=self.backend)

    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        """
        Args:
            x: Tokens ``(B, N, C)``: the ``(h, w)`` map row-major, after the class token if any.
            size: ``(h, w)`` of the map.

        Returns:
            Tokens ``(B, N, C)``.
        """
        h, w = size[0], size[1]
        p = self.num_prefix_tokens
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] != p + h * w:
            raise ValueError(f"AgentAttention: expected tokens (B, {p} + h * w, C={self.dim}) for size={(h, w)}, "
                             f"got shape {list(x.shape)}")
        B, N, C = x.shape
        heads = self.num_heads
        if self.fused_qkv:
            qkv = self.qkv(x).view(B, N, 3, heads, C // heads)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # B, N, H, D (strided views)
        else:
            q = self.q(x).view(B, N, heads, C // heads)
            kv = self.kv(x).view(B, N, 2, heads, C // heads)
            k, v = kv[:, :, 0], kv[:, :, 1]
        q_map = q[:, p:].reshape(B, h, w, C).permute(0, 3, 1, 2)  # NCHW view of the patch queries
        agents = F.adaptive_avg_pool2d(q_map, self.agent_shape).flatten(2).transpose(1, 2)  # B, M, C
        agents = agents.reshape(B, -1, heads, C // heads)
        bias_ak, bias_qa = self.biases((h, w))
        if torch.jit.is_scripting():
            out = _explicit_agent_attention(q, k, v, agents, bias_ak, bias_qa, self.scale)
        else:
            out = self._fused_attn(q, k, v, agents, bias_ak, bias_qa)
        out = out.reshape(B, N, C)
        lepe = self.dwc(v[:, p:].reshape(B, h, w, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, h * w, C)
        if p > 0:
            out = torch.cat([out[:, :p], out[:, p:] + lepe], dim=1)
        else:
            out = out + lepe
        return self.proj_drop(self.proj(out))

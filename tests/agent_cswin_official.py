"""The authors' Agent-CSwin, re-stated from its description for parity tests (Han et al., "Agent Attention",
ECCV 2024; the CSWin Transformer host of Dong et al., CVPR 2022).

Same module names as the release checkpoints (`stage1_conv_embed.{0,2}`, `stage{s}.{j}.{qkv, norm1, proj,
attns.{b}, mlp.fc1, mlp.fc2, norm2}`, `merge{i}.{conv, norm}`, `norm`, `head`), tokens (B, L, C) on square
maps whose size is fixed at construction, and the official formulation: agent blocks ("A") run agent
attention over the whole stage map with both position biases built per batch element (`.repeat`) and
explicit softmax; cross-shaped blocks ("B") split the channels into a vertical- and a horizontal-stripe
half (one full-map branch in the last stage) with a depthwise conv of v taken inside each stripe.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _to_windows(x, wh, ww):  # B, C, H, W -> B * windows, wh * ww, C
    B, C, H, W = x.shape
    return x.reshape(B, C, H // wh, wh, W // ww, ww).permute(0, 2, 4, 3, 5, 1).reshape(-1, wh * ww, C)


def _from_windows(x, wh, ww, H, W):  # B * windows, wh * ww, C -> B, H * W, C
    B = x.shape[0] // ((H // wh) * (W // ww))
    return x.reshape(B, H // wh, W // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H * W, -1)


def _window_conv(v, conv, wh, ww):  # the conv sees one window at a time (zero padding at window borders)
    B, C, H, W = v.shape
    v = v.reshape(B, C, H // wh, wh, W // ww, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, wh, ww)
    return conv(v).reshape(-1, C, wh * ww).transpose(1, 2)  # B * windows, wh * ww, C


class OfficialStripeAttention(nn.Module):
    """LePE attention in windows of wh x ww: idx 0 vertical stripes, 1 horizontal stripes, -1 the whole map."""

    def __init__(self, dim, resolution, idx, split_size, num_heads):
        super().__init__()
        self.resolution, self.num_heads = resolution, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wh, self.ww = {-1: (resolution, resolution), 0: (resolution, split_size),
                            1: (split_size, resolution)}[idx]
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, q, k, v):  # B, L, C each
        B, L, C = q.shape
        R, m = self.resolution, self.num_heads
        maps = [t.transpose(1, 2).reshape(B, C, R, R) for t in (q, k, v)]
        q, k, v = (_to_windows(t, self.wh, self.ww).reshape(-1, self.wh * self.ww, m, C // m).transpose(1, 2)
                   for t in maps)
        lepe = _window_conv(maps[2], self.get_v, self.wh, self.ww).reshape(-1, self.wh * self.ww, m, C // m)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn @ v + lepe.transpose(1, 2)  # windows, heads, T, d
        return _from_windows(out.transpose(1, 2).reshape(-1, self.wh * self.ww, C), self.wh, self.ww, R, R)


class OfficialAgentAttention(nn.Module):
    """Agent attention over the whole R x R map, biases composed and repeated per batch element."""

    def __init__(self, dim, resolution, num_heads, agent_num):
        super().__init__()
        self.resolution, self.num_heads, self.agent_num = resolution, num_heads, agent_num
        self.scale = (dim // num_heads) ** -0.5
        R, m, n = resolution, num_heads, agent_num
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(m, n, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(m, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, m, n, R, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, m, n, 1, R))
        self.ha_bias = nn.Parameter(torch.zeros(1, m, R, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, m, 1, R, n))
        self.pool = nn.AdaptiveAvgPool2d(int(agent_num ** 0.5))

    def forward(self, q, k, v):  # B, L, C each
        B, L, C = q.shape
        R, m, n = self.resolution, self.num_heads, self.agent_num
        v_map = v.transpose(1, 2).reshape(B, C, R, R)
        lepe = self.get_v(v_map).reshape(B, C, L).transpose(1, 2)
        agents = self.pool(q.transpose(1, 2).reshape(B, C, R, R)).reshape(B, C, n).transpose(1, 2)
        q, k, v, agents = (t.reshape(B, -1, m, C // m).transpose(1, 2) for t in (q, k, v, agents))
        an = F.interpolate(self.an_bias, size=(R, R), mode='bilinear').reshape(1, m, n, L).repeat(B, 1, 1, 1)
        ahw = (self.ah_bias + self.aw_bias).reshape(1, m, n, L).repeat(B, 1, 1, 1)
        agent_attn = ((agents * self.scale) @ k.transpose(-2, -1) + an + ahw).softmax(dim=-1)
        agent_v = agent_attn @ v  # B, heads, n, d
        na = F.interpolate(self.na_bias, size=(R, R), mode='bilinear').reshape(1, m, n, L)
        na = na.transpose(-2, -1).repeat(B, 1, 1, 1)
        haw = (self.ha_bias + self.wa_bias).reshape(1, m, L, n).repeat(B, 1, 1, 1)
        q_attn = ((q * self.scale) @ agents.transpose(-2, -1) + na + haw).softmax(dim=-1)
        return (q_attn @ agent_v).transpose(1, 2).reshape(B, L, C) + lepe


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialBlock(nn.Module):
    def __init__(self, dim, reso, num_heads, split_size, mlp_ratio, last_stage, agent_num, attn_type):
        super().__init__()
        self.dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm1 = nn.LayerNorm(dim)
        single = last_stage or reso == split_size
        self.proj = nn.Linear(dim, dim)
        if attn_type == 'A':  # the released configs give A blocks a split equal to the map: one branch
            assert single
            self.attns = nn.ModuleList([OfficialAgentAttention(dim, reso, num_heads, agent_num)])
        elif single:
            self.attns = nn.ModuleList([OfficialStripeAttention(dim, reso, -1, split_size, num_heads)])
        else:
            self.attns = nn.ModuleList([OfficialStripeAttention(dim // 2, reso, i, split_size, num_heads // 2)
                                        for i in range(2)])
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):  # B, L, C
        C = self.dim
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        if len(self.attns) == 2:
            h = C // 2
            out = torch.cat([self.attns[0](q[..., :h], k[..., :h], v[..., :h]),
                             self.attns[1](q[..., h:], k[..., h:], v[..., h:])], dim=-1)
        else:
            out = self.attns[0](q, k, v)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class _ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class OfficialMerge(nn.Module):
    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x):
        B, L, C = x.shape
        R = int(round(L ** 0.5))
        return self.norm(self.conv(x.transpose(1, 2).reshape(B, C, R, R)).flatten(2).transpose(1, 2))


class OfficialAgentCSWin(nn.Module):
    def __init__(self, img_size=224, embed_dim=64, depth=(2, 4, 18, 1), split_size=(1, 2, 7, 7),
                 num_heads=(2, 4, 8, 16), mlp_ratio=4., agent_num=(9, 16, 49, 49), attn_type='AABB',
                 num_classes=1000):
        super().__init__()
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(3, embed_dim, 7, 4, 2), _ToTokens(), nn.LayerNorm(embed_dim))
        dim = embed_dim
        for i in range(4):
            reso = img_size // 2 ** (i + 2)
            split = reso if attn_type[i] == 'A' else split_size[i]  # la_split_size: the whole stage map
            if i > 0:
                setattr(self, f'merge{i}', OfficialMerge(dim, 2 * dim))
                dim *= 2
            setattr(self, f'stage{i + 1}', nn.ModuleList([
                OfficialBlock(dim, reso, num_heads[i], split, mlp_ratio, i == 3, agent_num[i], attn_type[i])
                for _ in range(depth[i])]))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stage1_conv_embed(x)
        for i in range(4):
            if i > 0:
                x = getattr(self, f'merge{i}')(x)
            for blk in getattr(self, f'stage{i + 1}'):
                x = blk(x)
        return self.head(self.norm(x).mean(1))


_TABLES = {'ah_bias': (3, False), 'aw_bias': (4, False), 'ha_bias': (2, True), 'wa_bias': (3, True)}
AGENT_BIASES = ('an_bias', 'na_bias', *_TABLES)


def resize_agent_tables(state_dict, model):
    """The authors' fine-tuning rule for another resolution: 1-D linear resize of the row / column tables."""
    out = dict(state_dict)
    target = model.state_dict()
    for key, value in state_dict.items():
        name = key.rsplit('.', 1)[-1]
        if name not in _TABLES or value.shape == target[key].shape:
            continue
        dim, agents_last = _TABLES[name]
        m, length = value.shape[1], value.shape[dim]
        n = value.numel() // (m * length)
        table = value.reshape(m, length, n).transpose(1, 2) if agents_last else value.reshape(m, n, length)
        table = F.interpolate(table, size=target[key].shape[dim], mode='linear')
        out[key] = (table.transpose(1, 2) if agents_last else table).reshape(target[key].shape)
    return out


OFFICIAL_VARIANTS = {
    'agent_cswin_tiny': dict(embed_dim=64, depth=(2, 4, 18, 1), num_heads=(2, 4, 8, 16)),
    'agent_cswin_small': dict(embed_dim=64, depth=(3, 6, 29, 2), num_heads=(2, 4, 8, 16)),
    'agent_cswin_base': dict(embed_dim=96, depth=(3, 6, 29, 2), num_heads=(4, 8, 16, 32)),
    'agent_cswin_base_384': dict(img_size=384, embed_dim=96, depth=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                                 split_size=(1, 2, 12, 12)),
    'test_agent_cswin': dict(img_size=64, embed_dim=24, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), mlp_ratio=2.,
                             split_size=(1, 2, 2, 2), agent_num=(4, 9, 4, 4)),
}


def randomize(model, seed=0):
    """Random weights, so parity tests exercise every parameter (the bias tables at a visible scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                scale = 0.5 if name.rsplit('.', 1)[-1] in AGENT_BIASES else 0.1
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model

"""The authors' Agent-Swin, Agent-PVT and Agent-DeiT (SPEC sections 4-6), re-stated from their description
for parity tests: the oracle of tests/test_agent_models.py.

Same module and parameter names as the release checkpoints (``layers.{i}.blocks.{j}`` with the patch
merging at the end of stage i, ``patch_embed{s}`` / ``pos_embed{s}`` / ``block{s}.{j}``, ``blocks.{i}``,
the persistent ``relative_position_index`` / ``attn_mask`` buffers of the Swin blocks), and the
official formulation: the biases ``.repeat``-ed per batch element, explicit softmax, agents pooled
with ``nn.AdaptiveAvgPool2d``. ``dense_agents`` pools more agents than the tables hold and resizes
the biases over the agent grid as the dense-task backbones do (``(ah + aw)`` resized as one map).
Square maps only, as the authors' classification code.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _interp(t, size):
    return F.interpolate(t, size=size, mode='bilinear', align_corners=False)


class OfficialAgentAttention(nn.Module):
    """kind: 'swin' (qkv), 'pvt' (q, kv), 'deit' (qkv and a class token)."""

    def __init__(self, dim, num_heads, agent_num, window, kind='swin', dense_agents=None):
        super().__init__()
        self.dim, self.num_heads, self.agent_num, self.window, self.kind = dim, num_heads, agent_num, window, kind
        self.scale = (dim // num_heads) ** -0.5
        if kind == 'pvt':
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        H, n = num_heads, agent_num
        self.an_bias = nn.Parameter(torch.zeros(H, n, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(H, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, H, n, window, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, H, n, 1, window))
        self.ha_bias = nn.Parameter(torch.zeros(1, H, window, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, H, 1, window, n))
        if kind == 'deit':
            self.ac_bias = nn.Parameter(torch.zeros(1, H, n, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, H, 1, n))
        self.side = int(n ** 0.5)
        self.dense = dense_agents
        self.pool = nn.AdaptiveAvgPool2d(dense_agents if dense_agents else (self.side, self.side))

    def _biases(self, b, h, w):
        H, n = self.num_heads, self.agent_num
        if self.dense is None:
            ak = _interp(self.an_bias, (h, w)).reshape(1, H, n, -1).repeat(b, 1, 1, 1)
            ak = ak + (self.ah_bias + self.aw_bias).reshape(1, H, n, -1).repeat(b, 1, 1, 1)
            qa = _interp(self.na_bias, (h, w)).reshape(1, H, n, -1).permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
            qa = qa + (self.ha_bias + self.wa_bias).reshape(1, H, -1, n).repeat(b, 1, 1, 1)
            return ak, qa
        s, m = self.side, self.dense[0] * self.dense[1]

        def over_agents(t):  # H, n, h, w -> H, h * w, m
            t = t.reshape(H, s, s, h * w).permute(0, 3, 1, 2)
            return _interp(t, self.dense).reshape(H, h * w, m)

        ak = over_agents(_interp(self.an_bias, (h, w))) + over_agents(_interp((self.ah_bias + self.aw_bias)[0], (h, w)))
        qa = over_agents(_interp(self.na_bias, (h, w))) + over_agents(
            _interp((self.ha_bias + self.wa_bias)[0].permute(0, 3, 1, 2), (h, w)))
        return ak.permute(0, 2, 1)[None].repeat(b, 1, 1, 1), qa[None].repeat(b, 1, 1, 1)

    def forward(self, x, h, w):  # B, N, C
        b, N, c = x.shape
        H, d = self.num_heads, c // self.num_heads
        if self.kind == 'pvt':
            q = self.q(x)
            k, v = self.kv(x).reshape(b, N, 2, c).permute(2, 0, 1, 3)
        else:
            q, k, v = self.qkv(x).reshape(b, N, 3, c).permute(2, 0, 1, 3)
        p = 1 if self.kind == 'deit' else 0
        agents = self.pool(q[:, p:].reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
        m = agents.shape[1]
        q, k, v = (t.reshape(b, N, H, d).permute(0, 2, 1, 3) for t in (q, k, v))
        agents = agents.reshape(b, m, H, d).permute(0, 2, 1, 3)
        ak, qa = self._biases(b, h, w)
        if p:
            ak = torch.cat([self.ac_bias.repeat(b, 1, 1, 1), ak], dim=-1)
            qa = torch.cat([self.ca_bias.repeat(b, 1, 1, 1), qa], dim=-2)
        agent_v = torch.softmax((agents * self.scale) @ k.transpose(-2, -1) + ak, dim=-1) @ v
        out = torch.softmax((q * self.scale) @ agents.transpose(-2, -1) + qa, dim=-1) @ agent_v
        out = out.transpose(1, 2).reshape(b, N, c)
        lepe = self.dwc(v[:, :, p:].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2))
        lepe = lepe.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = torch.cat([out[:, :p], out[:, p:] + lepe], dim=1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _windows(x, ws):  # B, H, W, C -> B * nW, ws * ws, C
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


class OfficialWindowAttention(nn.Module):
    def __init__(self, dim, ws, num_heads):
        super().__init__()
        self.ws, self.num_heads, self.scale = ws, num_heads, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer('relative_position_index', rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rpb = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + rpb.permute(2, 0, 1)[None]
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C))


class OfficialSwinBlock(nn.Module):
    def __init__(self, dim, res, num_heads, ws, shift, agent_num, attn_type, dense_agents=None):
        super().__init__()
        self.res, self.attn_type = res, attn_type
        if res <= ws:
            ws, shift = res, 0
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == 'A':
            self.attn = OfficialAgentAttention(dim, num_heads, agent_num, ws, 'swin', dense_agents)
        else:
            self.attn = OfficialWindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        mask = None
        if shift:
            img = torch.zeros(1, res, res, 1)
            cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for i, hs in enumerate(cuts):
                for j, wsl in enumerate(cuts):
                    img[:, hs, wsl] = 3 * i + j
            mw = _windows(img, ws)[..., 0]
            mask = (mw[:, None] - mw[:, :, None]).ne(0).float() * -100.
        self.register_buffer('attn_mask', mask)

    def forward(self, x):  # B, L, C
        B, L, C = x.shape
        r, ws = self.res, self.ws
        y = self.norm1(x).view(B, r, r, C)
        if self.attn_type == 'A':  # the window is the whole map
            y = self.attn(y.reshape(B, L, C), r, r)
        else:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2)) if self.shift else y
            y = self.attn(_windows(y, ws), self.attn_mask)
            y = y.view(B, r // ws, r // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, r, r, C)
            y = torch.roll(y, (self.shift, self.shift), (1, 2)) if self.shift else y
            y = y.reshape(B, L, C)
        x = x + y
        return x + self.mlp(self.norm2(x))


class OfficialPatchMerging(nn.Module):
    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, self.res, self.res, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class _Layer(nn.Module):
    def __init__(self, blocks, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class OfficialAgentSwin(nn.Module):
    def __init__(self, img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56,
                 agent_num=(9, 16, 49, 49), attn_type='AAAB', num_classes=1000, dense_agents=None, b_window=None):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, 4, 4)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList()
        res = img_size // 4
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            kind = attn_type[i]
            types = [('A' if j < int(attn_type[4:]) else 'B') if kind == 'M' else kind for j in range(depth)]
            blocks = []
            for j in range(depth):
                # b_window: a smaller W-MSA window than the authors' rule, for shifted windows at test sizes
                ws = window_size if types[j] == 'A' else (b_window or max(7, window_size // 8))
                blocks.append(OfficialSwinBlock(dim, res, num_heads[i], ws, 0 if j % 2 == 0 else ws // 2,
                                                agent_num[i], types[j], dense_agents[i] if dense_agents else None))
            self.layers.append(_Layer(blocks, OfficialPatchMerging(res, dim) if i < len(depths) - 1 else None))
            res //= 2
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        x = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
        for layer in self.layers:
            for blk in layer.blocks:
                x = blk(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.head(self.norm(x).mean(1))


class OfficialPVTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, agent_num, window, dense_agents=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAgentAttention(dim, num_heads, agent_num, window, 'pvt', dense_agents)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class OfficialAgentPVT(nn.Module):
    def __init__(self, img_size=224, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 depths=(2, 2, 2, 2), agent_num=(9, 16, 49, 49), num_classes=1000, dense_agents=None):
        super().__init__()
        res, in_chs = img_size // 4, 3
        self.grids = []
        for i in range(4):
            pe = nn.Module()
            pe.proj = nn.Conv2d(in_chs, embed_dims[i], 4 if i == 0 else 2, 4 if i == 0 else 2)
            pe.norm = nn.LayerNorm(embed_dims[i])
            setattr(self, f'patch_embed{i + 1}', pe)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, res * res, embed_dims[i])))
            setattr(self, f'block{i + 1}', nn.ModuleList([
                OfficialPVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], agent_num[i], res,
                                 dense_agents[i] if dense_agents else None) for _ in range(depths[i])]))
            self.grids.append(res)
            res, in_chs = res // 2, embed_dims[i]
        self.head = nn.Linear(embed_dims[3], num_classes)

    def forward(self, x):
        B = x.shape[0]
        for i in range(4):
            pe = getattr(self, f'patch_embed{i + 1}')
            x = pe.proj(x)
            h, w = x.shape[-2:]
            x = pe.norm(x.flatten(2).transpose(1, 2))
            pos = getattr(self, f'pos_embed{i + 1}')
            g = self.grids[i]
            pos = _interp(pos.reshape(1, g, g, -1).permute(0, 3, 1, 2), (h, w)).reshape(1, -1, h * w).permute(0, 2, 1)
            x = x + pos
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, h, w)
            if i < 3:
                x = x.reshape(B, h, w, -1).permute(0, 3, 1, 2)
        return self.head(x.mean(1))


class OfficialViTAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class OfficialDeiTBlock(nn.Module):
    def __init__(self, dim, num_heads, agent_num, window, agent):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAgentAttention(dim, num_heads, agent_num, window, 'deit') if agent else \
            OfficialViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class OfficialAgentDeiT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49,
                 agent_layer=-1, num_classes=1000):
        super().__init__()
        self.grid = img_size // patch_size
        agent_layer = agent_layer if agent_layer > 0 else depth
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList([OfficialDeiTBlock(embed_dim, num_heads, agent_num, self.grid, i < agent_layer)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, h, w)
        return self.head(self.norm(x)[:, 0])


OFFICIAL_VARIANTS = {
    'agent_swin_tiny': (OfficialAgentSwin, dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'agent_swin_small': (OfficialAgentSwin, dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                                                 attn_type='AABB')),
    'agent_swin_base': (OfficialAgentSwin, dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                                attn_type='AAMB2')),
    'agent_pvt_tiny': (OfficialAgentPVT, dict(depths=(2, 2, 2, 2))),
    'agent_pvt_small': (OfficialAgentPVT, dict(depths=(3, 4, 6, 3))),
    'agent_pvt_medium': (OfficialAgentPVT, dict(depths=(3, 4, 18, 3))),
    'agent_pvt_large': (OfficialAgentPVT, dict(depths=(3, 8, 27, 3))),
    'agent_deit_tiny': (OfficialAgentDeiT, dict(embed_dim=192, num_heads=3)),
    'agent_deit_small': (OfficialAgentDeiT, dict(embed_dim=384, num_heads=6)),
    'agent_deit_base': (OfficialAgentDeiT, dict(embed_dim=768, num_heads=12, agent_num=81, agent_layer=4)),
    # the CI-sized members, as their registrations in zoo/ configure them
    'test_agent_swin': (OfficialAgentSwin, dict(img_size=64, embed_dim=12, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4),
                                                window_size=16, agent_num=(4, 4, 4, 4), attn_type='AAMB1', b_window=2)),
    'test_agent_pvt': (OfficialAgentPVT, dict(img_size=64, embed_dims=(24, 32, 48, 64), num_heads=(1, 2, 2, 4),
                                              mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1), agent_num=(4, 4, 4, 1))),
    'test_agent_deit': (OfficialAgentDeiT, dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                                agent_num=4, agent_layer=2)),
}


def build_official(name, **overrides):
    cls, kwargs = OFFICIAL_VARIANTS[name]
    return cls(**dict(kwargs, **overrides))


def randomize(model, seed=0):
    """Random values for every parameter and float buffer (the attention masks keep theirs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith('attn_mask'):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1. if name.endswith('norm.weight') else 0.))
    return model

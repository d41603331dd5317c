"""The authors' BiFormer, legacy formulation (SPEC section 3), re-written from its description for parity
tests and as the "official" peer of tools/bench_routing.py.

Same module names as the release checkpoints (`downsample_layers`, `stages.{s}.{b}`, `attn.qkv.qkv`,
`attn.wo`, `mlp.{0,3}`, `norm`, `head`), NCHW between blocks, and the gather formulation: each
query region's top-k key / value regions are copied out (`torch.gather`), then explicit matmul,
softmax, matmul.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _QKVLinear(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)


class OfficialBRA(nn.Module):
    def __init__(self, dim, num_heads, n_win, topk, auto_pad=False):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk, self.auto_pad = dim, num_heads, n_win, topk, auto_pad
        self.scale = dim ** -0.5
        self.qkv = _QKVLinear(dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x):  # N, H, W, C
        N, H0, W0, C = x.shape
        S, m = self.n_win, self.num_heads
        x = F.pad(x, (0, 0, 0, (S - W0 % S) % S, 0, (S - H0 % S) % S)) if self.auto_pad else x
        _, H, W, _ = x.shape
        h, w = H // S, W // S
        x = x.reshape(N, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, S * S, h, w, C)
        q, kv = self.qkv.qkv(x).split([C, 2 * C], dim=-1)
        q_pix = q.reshape(N, S * S, h * w, C)
        kv_pix = kv.reshape(N, S * S, h * w, 2 * C)
        q_win, k_win = q.mean([2, 3]), kv[..., :C].mean([2, 3])
        v_map = kv[..., C:].reshape(N, S, S, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
        lepe = self.lepe(v_map).permute(0, 2, 3, 1)
        logit = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        idx = torch.topk(logit, k=self.topk, dim=-1).indices  # N, R, topk
        R, T = S * S, h * w
        sel = torch.gather(kv_pix.view(N, 1, R, T, 2 * C).expand(-1, R, -1, -1, -1), 2,
                           idx.view(N, R, self.topk, 1, 1).expand(-1, -1, -1, T, 2 * C))
        k_sel, v_sel = sel.split([C, C], dim=-1)  # N, R, topk, T, C
        k_sel = k_sel.reshape(N * R, self.topk * T, m, C // m).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(N * R, self.topk * T, m, C // m).transpose(1, 2)
        qh = q_pix.reshape(N * R, T, m, C // m).transpose(1, 2)
        attn = ((qh * self.scale) @ k_sel).softmax(dim=-1)
        out = (attn @ v_sel).transpose(1, 2).reshape(N, S, S, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, C)
        out = self.wo(out + lepe)
        return out[:, :H0, :W0].contiguous()


class OfficialAttentionLePE(nn.Module):
    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x):  # N, H, W, C
        N, H, W, C = x.shape
        qkv = self.qkv(x).reshape(N, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        lepe = self.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(N, H * W, C) + lepe
        return self.proj(out).reshape(N, H, W, C)


class OfficialBlock(nn.Module):
    def __init__(self, dim, num_heads, n_win, topk, mlp_ratio=3, auto_pad=False):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAttentionLePE(dim) if topk == -1 else OfficialBRA(dim, num_heads, n_win, topk, auto_pad)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):  # N, C, H, W
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class OfficialBiFormer(nn.Module):
    def __init__(self, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), head_dim=32, n_win=7,
                 topks=(1, 4, 16, -1), mlp_ratio=3, auto_pad=False, num_classes=1000):
        super().__init__()
        d = embed_dims
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, d[0] // 2, 3, 2, 1), nn.BatchNorm2d(d[0] // 2), nn.GELU(),
            nn.Conv2d(d[0] // 2, d[0], 3, 2, 1), nn.BatchNorm2d(d[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(d[i], d[i + 1], 3, 2, 1), nn.BatchNorm2d(d[i + 1])))
        self.stages = nn.ModuleList([
            nn.Sequential(*[OfficialBlock(d[i], d[i] // head_dim, n_win, topks[i], mlp_ratio, auto_pad)
                            for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.BatchNorm2d(d[-1])
        self.head = nn.Linear(d[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x).flatten(2).mean(-1))


OFFICIAL_VARIANTS = {
    'biformer_tiny': dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)),
    'biformer_small': dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)),
    'biformer_base': dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)),
    'test_biformer': dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 32, 64), head_dim=8, n_win=2, topks=(1, 2, 4, -1),
                          mlp_ratio=2),
}


def randomize(model, seed=0):
    """Random weights and BN statistics, so parity tests exercise every parameter and buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if 'running_var' in name
                        else torch.randn(t.shape, generator=g) * 0.1)
    return model

"""Brute-force halo attention oracle, written straight from SPEC section 2 and timm's HaloAttn.

Loops over every query, lists its window positions with plain integers (positions off the map
are zero keys and values, not masked), adds the decomposed positional logits, and runs a dense
softmax in float64. Small sizes only.
"""
import torch


def oracle(q, k, v, block_size, halo_size, stride=1, rel_h=None, rel_w=None, scale=None, scale_rel=False):
    """q ``[B, H/s, W/s, h, D]``, k ``[B, H, W, h, D]``, v ``[B, H, W, h, Dv]``; returns
    ``(out, lse)`` in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, W, heads, D = k.shape
    Hq, Wq = q.shape[1], q.shape[2]
    b, hs = block_size, halo_size
    bq, win = b // stride, b + 2 * halo_size
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float64)
    for y in range(Hq):
        for x in range(Wq):
            by, qy = divmod(y, bq)
            bx, qx = divmod(x, bq)
            keys, vals, pos = [], [], []
            for ky in range(win):
                for kx in range(win):
                    ay, ax = by * b - hs + ky, bx * b - hs + kx
                    inside = 0 <= ay < H and 0 <= ax < W
                    keys.append(k[:, ay, ax] if inside else torch.zeros(B, heads, D, dtype=torch.float64))
                    vals.append(v[:, ay, ax] if inside else torch.zeros(B, heads, v.shape[-1], dtype=torch.float64))
                    if rel_h is not None:
                        pos.append((rel_h[ky - qy + win - 1].double(), rel_w[kx - qx + win - 1].double()))
            kk = torch.stack(keys, 1)  # B, n, h, D
            vv = torch.stack(vals, 1)
            qi = q[:, y, x]  # B, h, D
            logits = torch.einsum("bhd,bnhd->bhn", qi, kk) * scale
            if rel_h is not None:
                rh = torch.stack([p[0] for p in pos])  # n, D
                rw = torch.stack([p[1] for p in pos])
                term = torch.einsum("bhd,nd->bhn", qi, rh) + torch.einsum("bhd,nd->bhn", qi, rw)
                logits = logits + (term * scale if scale_rel else term)
            lse[:, y, x] = torch.logsumexp(logits, -1)
            out[:, y, x] = torch.einsum("bhn,bnhd->bhd", torch.softmax(logits, -1), vv)
    return out, lse

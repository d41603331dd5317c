"""The logit tables of the Triton kernels (kernels/neighborhood_tables.py), checked on the CPU
against the window rule directly: every program's table, looked up through its class, holds
exactly its neighbor pairs with their bias index, and no pair is lost or counted twice."""
import math
import random

import pytest
import torch

pytest.importorskip("triton")

import foveal.kernels.neighborhood_tables as tables  # noqa: E402
import foveal.kernels.neighborhood_triton as nt  # noqa: E402
from foveal.kernels.neighborhood_reference import group_windows  # noqa: E402


def _geometry(sizes, kernel, dilation, stride, causal):
    return nt._geometry_of(tuple(sizes), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal))


def _direct(geo, cfg, keys_major, g, t):
    """The [n_it * BLOCK_N] column coordinates and the [BLOCK_M, n_it * BLOCK_N] flat bias index
    (-1 masked) of the program of group g and tile t (per-axis tuples), from the window rule."""
    rows, boxes, starts = [], [], []
    for a in range(3):
        L, k, d, s, c, T = (geo.sizes[a], geo.kernel[a], geo.dilation[a], geo.stride[a], geo.causal[a], cfg.tile[a])
        glen = (L - g[a] + d - 1) // d
        start, end = group_windows(glen, k, s, c)
        r = t[a] * T + torch.arange(T)
        first, last = min(t[a] * T, glen - 1), min(t[a] * T + T - 1, glen - 1)
        if keys_major:
            attends = (start <= last) & (end > first)  # queries whose window meets the key tile
            idx = attends.nonzero().flatten()
            b0, b1 = int(idx[0]), int(idx[-1]) + 1
        else:
            b0, b1 = int(start[first]), int(end[last])
        rows.append((r, r < glen))
        boxes.append((b0, b1))
        starts.append((start, end))
    extent = tuple(b1 - b0 for b0, b1 in boxes)
    n_it = tables._n_it(extent, cfg.block_n, cfg.wz)
    lx, ly, lz, valid = tables._box_slots(extent, n_it, cfg.block_n, cfg.wz, geo.ndim)
    bm = math.prod(cfg.tile)
    m = torch.arange(bm)
    mloc = (m // (cfg.tile[1] * cfg.tile[2]), (m // cfg.tile[2]) % cfg.tile[1], m % cfg.tile[2])
    ok = valid[None, :].expand(bm, -1).clone()
    flat = torch.zeros(bm, n_it * cfg.block_n, dtype=torch.long)
    for a, l in enumerate((lx, ly, lz)):
        r, r_ok = rows[a]
        r, r_ok = r[mloc[a]], r_ok[mloc[a]]
        col = boxes[a][0] + l
        start, end = starts[a]
        colc = col.clamp(max=len(start) - 1)
        if keys_major:  # row = key, col = query
            inwin = (start[colc][None, :] <= r[:, None]) & (r[:, None] < end[colc][None, :])
            rel = r[:, None] - col[None, :] + geo.kernel[a] - 1
        else:
            rc = r.clamp(max=len(start) - 1)
            inwin = (start[rc][:, None] <= col[None, :]) & (col[None, :] < end[rc][:, None])
            rel = col[None, :] - r[:, None] + geo.kernel[a] - 1
        ok &= inwin & r_ok[:, None]
        flat = flat * (2 * geo.kernel[a] - 1) + rel
    return n_it, torch.where(ok, flat, -1)


def _check(geo, cfg, keys_major):
    p = tables.plan(geo, cfg, keys_major, 1, torch.float32, torch.device("cpu"))
    assert p is not None
    n_tiles = cfg.n_tiles(geo)
    cls = p.cls.tolist()
    offsets = (0, geo.dilation[0] * n_tiles[0], geo.dilation[0] * n_tiles[0] + geo.dilation[1] * n_tiles[1])
    pairs = 0
    for g in torch.cartesian_prod(*[torch.arange(d) for d in geo.dilation]).view(-1, 3).tolist():
        for t in torch.cartesian_prod(*[torch.arange(n) for n in n_tiles]).view(-1, 3).tolist():
            ids = [cls[offsets[a] + g[a] * n_tiles[a] + t[a]] for a in range(3)]
            combo = (ids[0] * p.n_classes[1] + ids[1]) * p.n_classes[2] + ids[2]
            n_it, want = _direct(geo, cfg, keys_major, g, t)
            got = p.index[combo, :n_it].transpose(0, 1).reshape(want.shape)
            got = torch.where(got == p.n_rel, -1, got)
            assert torch.equal(got, want), (g, t)
            pairs += int((want >= 0).sum())
    # every neighbor pair once: the sum over programs equals the pairs of the whole map
    expected = 1
    for L, k, d, s, c in zip(geo.sizes, geo.kernel, geo.dilation, geo.stride, geo.causal):
        expected *= sum(int((e - st).sum()) for st, e in
                        (group_windows((L - g + d - 1) // d, k, s, c) for g in range(d)))
    assert pairs == expected
    return p


def test_nat_stage_classes():
    geo = _geometry((56, 56), (7, 7), (1, 1), (1, 1), (False, False))
    p = _check(geo, nt._Config((1, 8, 8), 32, 0, 4, 2), False)
    assert p.n_classes == (1, 3, 3)  # first tile, the interior, the last tile
    _check(geo, nt._Config((1, 8, 8), 64, 16, 4, 2), True)


@pytest.mark.parametrize("seed", range(24))
def test_random_geometries(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 2, 3])
    sizes = [rng.randint(3, 13) if n < 3 else rng.randint(2, 7) for _ in range(n)]
    kernel, dilation, stride, causal = [], [], [], []
    for L in sizes:
        k = rng.randint(2, L)
        kernel.append(k)
        dilation.append(rng.randint(1, L // k))
        stride.append(rng.randint(1, k) if rng.random() < 0.3 else 1)
        causal.append(rng.random() < 0.25)
    geo = _geometry(sizes, kernel, dilation, stride, causal)
    tile = tuple(rng.choice([1, 2, 4]) if a >= 3 - n else 1 for a in range(3))
    wz = rng.choice([0, 2, 4, 8])
    block_n = max(wz, 1) * rng.choice([1, 2, 4]) if wz else rng.choice([4, 8, 16])
    _check(geo, nt._Config(tile, block_n, wz, 4, 1), rng.random() < 0.5)


def test_too_large_falls_back():
    geo = _geometry((64, 64), (31, 31), (1, 1), (1, 1), (False, False))
    cfg = nt._Config((1, 8, 8), 64, 0, 4, 2)
    assert tables.plan(geo, cfg, False, 1 << 12, torch.float32, torch.device("cpu")) is None

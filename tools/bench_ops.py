"""Neighborhood-attention op benchmark: foveal's Triton kernels against compiled FlexAttention with
a neighborhood mask, dense SDPA and the reference backend, on one CUDA GPU.

One run measures the device's ceilings first (device-to-device copy bandwidth, counting bytes read
and written; an 8192^3 bf16 matmul), then times every row of the performance list with
``triton.testing.do_bench`` (median; warm-up; L2 flushed; random inputs drawn per row) twice: as
eager calls, and as replays of a CUDA graph of one call, which is the GPU time without Python and
launch overhead. Targets are judged on the graph times, the same way for every method. It writes
a markdown table (``--out``) plus one JSON line per measurement (``--json``).

Counting: bytes are q, k, v and o (forward) plus do, dq, dk and dv (backward), each read or written
once; effective TFLOP/s count attended pairs only, ``4 * B * N * heads * D * pairs_per_query`` for
the forward and 3.5x that for forward+backward (two forward matmuls, five backward ones). Dense
SDPA's own rate counts its N^2 pairs. FlexAttention gets a ``mask_mod`` built from foveal's window
rule (``axis_windows``) and is timed in two token orders, row-major and tiled (each dilation group
cut into tiles of 128 tokens: 8x16 in 2-D, 2x8x8 in 3-D); the better one is reported. Its output
is checked against foveal's once per row.

Usage:
    python tools/bench_ops.py --out bench.md [--json bench.jsonl] [--rows main,dil4] [--budget-s 500]
"""
import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from foveal.kernels import neighborhood_attention
from foveal.kernels.neighborhood_reference import axis_windows


@dataclass
class Row:
    key: str
    label: str
    batch: int
    spatial: tuple
    heads: int
    head_dim: int
    kernel: tuple
    dilation: tuple = None
    rpb: bool = False
    modes: tuple = ("fwd", "fwd+bwd")
    methods: tuple = ("foveal", "flex", "sdpa")
    reference: bool = False
    notes: list = field(default_factory=list)

    def __post_init__(self):
        n = len(self.spatial)
        self.kernel = tuple(self.kernel) if isinstance(self.kernel, tuple) else (self.kernel,) * n
        d = 1 if self.dilation is None else self.dilation
        self.dilation = tuple(d) if isinstance(d, tuple) else (d,) * n

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def pairs(self) -> int:
        return math.prod(self.kernel)


ROWS = [
    Row("main", "56x56 B128 h2 D32 k7", 128, (56, 56), 2, 32, 7, reference=True),
    Row("main_rpb", "56x56 B128 h2 D32 k7 +RPB", 128, (56, 56), 2, 32, 7, rpb=True, methods=("foveal",)),
    Row("wide", "56x56 B8 h32 D32 k7", 8, (56, 56), 32, 32, 7),
    Row("seq1d", "1-D L32768 B1 h8 D64 k2048", 1, (32768,), 8, 64, 2048, modes=("fwd",)),
    Row("vol3d", "3-D 16x32x32 B1 h8 D64 k(3,7,7)", 1, (16, 32, 32), 8, 64, (3, 7, 7), modes=("fwd",)),
    Row("dil4", "56x56 B128 h2 D32 k7 d4", 128, (56, 56), 2, 32, 7, dilation=4),
    Row("dil8", "56x56 B128 h2 D32 k7 d8", 128, (56, 56), 2, 32, 7, dilation=8),
    Row("map14", "14x14 B128 h8 D32 k7", 128, (14, 14), 8, 32, 7),
    Row("map7", "7x7 B128 h16 D32 k7", 128, (7, 7), 16, 32, 7),
    Row("large13", "128x128 B1 h16 D128 k13", 1, (128, 128), 16, 128, 13),
    Row("large31", "256x256 B1 h24 D128 k31", 1, (256, 256), 24, 128, 31),
]

TILE_ORDER = {1: (128,), 2: (8, 16), 3: (2, 8, 8)}


def _log(*args):
    print(*args, flush=True)


def _bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn) -> float:
    """Median GPU time of one call replayed from a CUDA graph (no host overhead; L2 flushed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # allocations, autotuning and compilation happen outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms


def measure_ceilings() -> dict:
    n = 1 << 28  # 1 GiB of float32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x))
    copy_gbs = 2 * x.numel() * 4 / (t * 1e-3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _bench(lambda: a @ b)
    mm_tflops = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
    return dict(copy_gbs=copy_gbs, mm_tflops=mm_tflops)


# -- FlexAttention with the neighborhood mask -----------------------------------------------------

def _token_order(row: Row, tiled: bool, device) -> torch.Tensor:
    """perm[p] = row-major index of the token at sequence position p."""
    grids = torch.meshgrid(*[torch.arange(L, device=device) for L in row.spatial], indexing="ij")
    coords = [g.reshape(-1) for g in grids]
    if not tiled:
        return torch.arange(row.tokens, device=device)
    keys = []
    tile = TILE_ORDER[len(row.spatial)]
    for c, d in zip(coords, row.dilation):
        keys.append(c % d)  # dilation group first
    for c, d, t in zip(coords, row.dilation, tile):
        keys.append((c // d) // t)
    for c, d, t in zip(coords, row.dilation, tile):
        keys.append((c // d) % t)
    key = torch.zeros_like(coords[0])
    for k in keys:
        key = key * (int(k.max()) + 1) + k
    return torch.argsort(key, stable=True)


def _flex_mask(row: Row, perm: torch.Tensor):
    """mask_mod over sequence positions, from the same window rule as the kernels."""
    device = perm.device
    grids = torch.meshgrid(*[torch.arange(L, device=device) for L in row.spatial], indexing="ij")
    coords = [g.reshape(-1)[perm] for g in grids]
    tables = []
    for c, L, k, d in zip(coords, row.spatial, row.kernel, row.dilation):
        nbr, _, _ = axis_windows(L, k, d, 1, False, device=device)
        start = (nbr[:, 0] // d)[c]  # window start inside the group, per position
        tables.append(((c % d).int(), (c // d).int(), start.int(), k))

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for group, coord, start, k in tables:
            rel = coord[kv_idx] - start[q_idx]
            m = (group[q_idx] == group[kv_idx]) & (rel >= 0) & (rel < k)
            ok = m if ok is None else ok & m
        return ok

    return mask_mod


# -- one row --------------------------------------------------------------------------------------

def _inputs(row: Row, device):
    shape = (row.batch, *row.spatial, row.heads, row.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    rpb = (torch.randn(row.heads, *[2 * x - 1 for x in row.kernel], device=device) * 0.02) if row.rpb else None
    return q, k, v, rpb


def _foveal_fns(row: Row, q, k, v, rpb, backend):
    def fwd():
        return neighborhood_attention(q, k, v, row.kernel, row.dilation, rpb=rpb, backend=backend)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([rpb.detach().requires_grad_()] if rpb is not None else [])
    go = torch.randn_like(q)

    def fwd_bwd():
        out = neighborhood_attention(*leaves[:3], row.kernel, row.dilation, rpb=leaves[3] if rpb is not None else None,
                                     backend=backend)
        return torch.autograd.grad(out, leaves, go)

    return fwd, fwd_bwd


def _seq(x, perm):  # [B, *spatial, h, D] -> [B, h, N, D] in sequence order
    B, h, D = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(B, -1, h, D)[:, perm].transpose(1, 2).contiguous()


def run_row(row: Row, ceilings: dict, deadline: float, records: list, flex_fn, phase: str, warm: bool = False):
    """phase "own": foveal, reference and SDPA; phase "flex": FlexAttention in both token orders."""
    device = "cuda"
    torch.manual_seed(sum(map(ord, row.key)))
    q, k, v, rpb = _inputs(row, device)
    B, N, h, D = row.batch, row.tokens, row.heads, row.head_dim
    itemsize = q.element_size()
    elems = B * N * h * D
    bytes_mode = {"fwd": 4 * elems * itemsize, "fwd+bwd": 12 * elems * itemsize}
    flops_na = {"fwd": 4 * B * N * h * D * row.pairs, "fwd+bwd": 3.5 * 4 * B * N * h * D * row.pairs}
    flops_dense = {m: f * N / row.pairs for m, f in flops_na.items()}
    def bench(fn):
        if warm:
            fn()
            torch.cuda.synchronize()
            return 0.0, 0.0
        eager = _bench(fn)
        try:
            return eager, _bench_graph(fn)
        except Exception as exc:  # noqa: BLE001 - report the eager time when a method cannot be captured
            _log(f"  graph capture failed ({type(exc).__name__}: {str(exc)[:160]}); using the eager time")
            torch.cuda.synchronize()
            return eager, eager

    def record(method, mode, times, extra=None):
        eager, ms = times if times is not None else (None, None)
        rec = dict(row=row.key, label=row.label, method=method, mode=mode, ms=ms, eager_ms=eager,
                   gbs=bytes_mode[mode] / (ms * 1e-3) / 1e9 if ms else None,
                   tflops=(flops_dense if method == "sdpa" else flops_na)[mode] / (ms * 1e-3) / 1e12 if ms else None,
                   floor_ms=bytes_mode[mode] / (ceilings["copy_gbs"] * 1e9) * 1e3)
        rec.update(extra or {})
        records.append(rec)
        _log(f"  {row.label:34s} {mode:8s} {method:14s} graph {ms} eager {eager} ms", rec.get("note", ""),
             rec.get("max_err_vs_foveal", ""))

    for mode in row.modes:
        if time.time() > deadline:
            _log(f"  budget spent: skipping {row.label} {mode} ({phase})")
            return
        if phase == "own":
            fwd, fwd_bwd = _foveal_fns(row, q, k, v, rpb, "triton")
            record("foveal", mode, bench(fwd if mode == "fwd" else fwd_bwd))
            if row.rpb:  # the same row without the bias, for the RPB overhead
                fwd0, fwd_bwd0 = _foveal_fns(row, q, k, v, None, "triton")
                record("foveal_norpb", mode, bench(fwd0 if mode == "fwd" else fwd_bwd0))
            if row.reference and not warm and time.time() < deadline:
                fwd, fwd_bwd = _foveal_fns(row, q, k, v, rpb, "reference")
                try:  # many small launches: eager only
                    record("reference", mode, (lambda t: (t, t))(_bench(fwd if mode == "fwd" else fwd_bwd)))
                except torch.OutOfMemoryError:
                    record("reference", mode, None, dict(note="out of memory"))
                torch.cuda.empty_cache()
            if "sdpa" in row.methods and not warm and time.time() < deadline:
                qs, ks, vs = (x.reshape(B, N, h, D).transpose(1, 2).contiguous() for x in (q, k, v))
                if mode == "fwd":
                    record("sdpa", mode, bench(lambda: F.scaled_dot_product_attention(qs, ks, vs)))
                else:
                    leaves = [t.requires_grad_() for t in (qs, ks, vs)]
                    go = torch.randn_like(qs)
                    record("sdpa", mode, bench(
                        lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, go)))
                del qs, ks, vs
        elif "flex" in row.methods and flex_fn is not None:
            ref_out = neighborhood_attention(q, k, v, row.kernel, row.dilation, backend="triton") if mode == "fwd" else None
            for tiled in (False, True):
                if tiled and len(row.spatial) == 1 and row.dilation == (1,):
                    continue  # 1-D tiles are the row-major order
                if time.time() > deadline:
                    break
                name = "flex-tiled" if tiled else "flex-rowmajor"
                try:
                    times, err = _time_flex(row, q, k, v, ref_out, tiled, mode, flex_fn, bench)
                    record(name, mode, times, dict(max_err_vs_foveal=err))
                except Exception as exc:  # noqa: BLE001 - a failed peer is reported, not fatal
                    record(name, mode, None, dict(note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
                torch.cuda.empty_cache()


def _time_flex(row, q, k, v, ref_out, tiled, mode, flex_fn, bench):
    from torch.nn.attention.flex_attention import create_block_mask

    perm = _token_order(row, tiled, q.device)
    mask_mod = _flex_mask(row, perm)
    N = row.tokens
    block_mask = torch.compile(create_block_mask)(mask_mod, None, None, N, N, device=q.device)
    qs, ks, vs = (_seq(x, perm) for x in (q, k, v))
    err = None
    if mode == "fwd":
        out = flex_fn(qs, ks, vs, block_mask=block_mask)
        if ref_out is not None:
            back = torch.empty_like(out)
            back[:, :, perm] = out
            want = ref_out.reshape(row.batch, N, row.heads, row.head_dim).transpose(1, 2)
            err = (back.float() - want.float()).abs().max().item()
        return bench(lambda: flex_fn(qs, ks, vs, block_mask=block_mask)), err
    leaves = [t.requires_grad_() for t in (qs, ks, vs)]
    go = torch.randn_like(qs)
    return bench(lambda: torch.autograd.grad(flex_fn(*leaves, block_mask=block_mask), leaves, go)), err


# -- report ---------------------------------------------------------------------------------------

def _best(records, row, mode, prefix):
    ms = [r["ms"] for r in records if r["row"] == row and r["mode"] == mode and r["ms"]
          and (r["method"] == prefix or r["method"].startswith(prefix + "-"))]
    return min(ms) if ms else None


def _targets(records) -> list:
    """(target, measured, pass) for every performance target of the issue."""
    out = []

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def add(text, value, ok, fmt="{:.2f}x"):
        out.append((text, "n/a" if value is None else fmt.format(value), "n/a" if value is None else ("yes" if ok(value) else "MISS")))

    for row in ("main", "wide"):
        fov = _best(records, row, "fwd", "foveal")
        floor = next((r["floor_ms"] for r in records if r["row"] == row and r["mode"] == "fwd"), None)
        add(f"{row}: fwd <= 2.2x memory floor", ratio(fov, floor), lambda x: x <= 2.2)
        add(f"{row}: fwd >= 4.5x faster than Flex", ratio(_best(records, row, "fwd", "flex"), fov), lambda x: x >= 4.5)
        add(f"{row}: fwd >= 8x faster than dense SDPA", ratio(_best(records, row, "fwd", "sdpa"), fov), lambda x: x >= 8)
        add(f"{row}: fwd+bwd >= 3.5x faster than Flex",
            ratio(_best(records, row, "fwd+bwd", "flex"), _best(records, row, "fwd+bwd", "foveal")), lambda x: x >= 3.5)
    for row in ("dil4", "dil8"):
        for mode in ("fwd", "fwd+bwd"):
            add(f"{row}: {mode} within 1.3x of dilation 1",
                ratio(_best(records, row, mode, "foveal"), _best(records, "main", mode, "foveal")), lambda x: x <= 1.3)
    for mode, limit in (("fwd", 1.2), ("fwd+bwd", 1.4)):
        on = _best(records, "main_rpb", mode, "foveal")
        off = next((r["ms"] for r in records if r["row"] == "main_rpb" and r["mode"] == mode and r["method"] == "foveal_norpb"), None)
        add(f"RPB on / off, {mode} <= {limit}x", ratio(on, off), lambda x, limit=limit: x <= limit)
    for row in ("large13", "large31"):
        for mode in ("fwd", "fwd+bwd"):
            fov = [r for r in records if r["row"] == row and r["mode"] == mode and r["method"] == "foveal"]
            sd = [r for r in records if r["row"] == row and r["mode"] == mode and r["method"] == "sdpa"]
            val = fov[0]["tflops"] / sd[0]["tflops"] if fov and sd and fov[0]["tflops"] and sd[0]["tflops"] else None
            add(f"{row}: {mode} effective TFLOP/s >= 35% of dense SDPA's", val, lambda x: x >= 0.35, "{:.0%}")
    for row in ("map14", "map7"):
        for mode in ("fwd", "fwd+bwd"):
            add(f"{row}: {mode} <= 1.1x dense SDPA",
                ratio(_best(records, row, mode, "foveal"), _best(records, row, mode, "sdpa")), lambda x: x <= 1.1)
    for row in ("seq1d", "vol3d"):
        add(f"{row}: fwd >= 3x faster than Flex",
            ratio(_best(records, row, "fwd", "flex"), _best(records, row, "fwd", "foveal")), lambda x: x >= 3)
    return out


def render(records, ceilings, meta) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; bf16 inputs.",
        f"Measured ceilings: copy {ceilings['copy_gbs']:.0f} GB/s (read + write), bf16 matmul "
        f"{ceilings['mm_tflops']:.0f} TFLOP/s. Command: `{meta['command']}`.",
        "",
        "| case | pass | method | GPU ms (graph) | eager ms | GB/s (% of copy) | eff. TFLOP/s (% of matmul) | foveal speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        fov = _best(records, r["row"], r["mode"], "foveal")
        if r["ms"] is None:
            lines.append(f"| {r['label']} | {r['mode']} | {r['method']} | {r.get('note', 'n/a')} | | | | |")
            continue
        gbs = f"{r['gbs']:.0f} ({r['gbs'] / ceilings['copy_gbs']:.0%})"
        tf = f"{r['tflops']:.1f} ({r['tflops'] / ceilings['mm_tflops']:.0%})"
        speed = "" if r["method"].startswith("foveal") or fov is None else f"{r['ms'] / fov:.2f}x"
        lines.append(f"| {r['label']} | {r['mode']} | {r['method']} | {r['ms']:.4f} | {r['eager_ms']:.4f} | {gbs} | {tf} | {speed} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in _targets(records)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="markdown table to write")
    parser.add_argument("--json", help="one JSON line per measurement")
    parser.add_argument("--rows", help="comma-separated row keys (default: all): " + ",".join(r.key for r in ROWS))
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--warm", action="store_true",
                        help="only compile and autotune (one call of everything, nothing timed), e.g. in parallel processes")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        sys.exit("bench_ops: needs a CUDA GPU")
    start = time.time()
    deadline = start + args.budget_s
    rows = ROWS if not args.rows else [r for r in ROWS if r.key in args.rows.split(",")]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command="python tools/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    ceilings = dict(copy_gbs=1.0, mm_tflops=1.0) if args.warm else measure_ceilings()
    _log(f"ceilings: {ceilings}")
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled graph per row and token order: lift dynamo's recompile limits, which would
        # otherwise send later rows to eager FlexAttention (a dense score matrix)
        for name in ("cache_size_limit", "accumulated_cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        flex_fn = torch.compile(flex_attention, dynamic=False)
    records = []
    for phase in ("own", "flex"):
        for row in rows:
            _log(f"[{time.time() - start:6.1f}s] {phase} {row.label}")
            run_row(row, ceilings, deadline, records, flex_fn, phase, warm=args.warm)
            if args.warm:
                continue
            if args.json:
                with open(args.json, "w") as f:
                    for r in records:
                        f.write(json.dumps(r) + "\n")
            with open(args.out, "w") as f:
                f.write(render(records, ceilings, meta))
    if not args.warm:
        _log(render(records, ceilings, meta))
    from foveal.kernels import neighborhood_triton

    for key, cfg in neighborhood_triton._TUNED.items():
        if not isinstance(cfg, neighborhood_triton._Config):  # a launch plan, not a tuned config
            continue
        _log(f"tuned {key[0]} {key[1].sizes} k{key[1].kernel} d{key[1].dilation} D{key[2][-1]} rpb={key[5]}: {cfg}")


if __name__ == "__main__":
    main()

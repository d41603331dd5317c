"""Bi-level routing attention benchmark on one CUDA GPU: foveal's routed op and BiFormer against their peers.

Two parts, side by side in one run:

- ``op``: the BRA token-attention core, bf16, forward and forward+backward, random routing of the
  right top-k, at six shapes: BiFormer-S stages 1-3 at 224 with batch 128 (56², 28², 14² maps, n_win
  7, top-k 1/4/16) and at COCO size with batch 2 (208x336, 112x176, 64x96 after auto-pad, n_win 16,
  top-k 1/4/16). Methods: foveal ``routed_attention`` and four peers written here:
  (a) the official gather formulation (K/V gathered top-k times, matmul, softmax, matmul);
  (b) the same gather, then SDPA per query region;
  (c) compiled FlexAttention on region-major tokens with a BlockMask from the routing (block sizes
      64 and 128 tried, the best kept; building the mask is not timed);
  (d) dense SDPA over all of the stage's tokens.
  Times are ``triton.testing.do_bench`` medians; peak memory is the allocator's peak above the inputs
  for one forward+backward. Effective TFLOP/s count the routed pairs, ``2 * B * heads * N * topk * T *
  (Dqk + Dv)`` forward, 2.5x that for forward+backward (dense SDPA is credited with the same work).
- ``model``: ``biformer_small`` (foveal), the official architecture re-implemented with its gather
  (tests/biformer_official.py, same weights layout) and timm's ``swin_tiny_patch4_window7_224``, bf16
  autocast, batch 128, 224 px, channels-last, eager and ``torch.compile``: inference and training
  img/s (SGD step included) and peak training memory.

Every case runs on its own: an out-of-memory or compile failure is recorded as an error row and the
run goes on. It writes a markdown table (``--out``) and one JSON line per measurement (``--json``).

Usage:
    python tools/bench_routing.py --out bench_routing.md [--json bench_routing.jsonl] [--parts op,model]
        [--quick] [--no-compile | --compiled-only] [--model-batch 128] [--steps 10]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from triton.testing import do_bench

import foveal  # noqa: F401  (registers biformer_*)
from foveal.kernels import routed_attention

ROOT = Path(__file__).resolve().parents[1]

# (name, batch, map H, map W, n_win, heads, head_dim, topk): BiFormer-S stages 1-3
SHAPES = [
    ("s1@224", 128, 56, 56, 7, 2, 32, 1),
    ("s2@224", 128, 28, 28, 7, 4, 32, 4),
    ("s3@224", 128, 14, 14, 7, 8, 32, 16),
    ("s1@coco", 2, 208, 336, 16, 2, 32, 1),
    ("s2@coco", 2, 112, 176, 16, 4, 32, 4),
    ("s3@coco", 2, 64, 96, 16, 8, 32, 16),
]
QUICK = ("s1@224", "s3@224", "s2@coco")


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _gather(t, idx):
    """``[B, R, T, C]`` -> the routed regions ``[B, R, topk, T, C]`` (the official top-k-fold copy)."""
    B, R, T, C = t.shape
    topk = idx.shape[-1]
    return torch.gather(t.view(B, 1, R, T, C).expand(-1, R, -1, -1, -1), 2,
                        idx.view(B, R, topk, 1, 1).expand(-1, -1, -1, T, C))


def _methods(B, R, T, heads, D, topk, scale, block_sizes, device="cuda"):
    """{label: (make inputs, run)}; each run returns the attention output."""
    C = heads * D

    def routing():
        return torch.rand(B, R, R, device=device).topk(topk, dim=-1).indices

    def ours_inputs():
        t = [torch.randn(B, R, T, heads, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        return (*t, routing())

    def ours(q, k, v, idx):
        return routed_attention(q, k, v, idx, scale, check_indices=False)

    def gather_inputs():
        q = torch.randn(B, R, T, C, device=device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(B, R, T, 2 * C, device=device, dtype=torch.bfloat16, requires_grad=True)
        return q, kv, routing()

    def gather_explicit(q, kv, idx):
        k, v = _gather(kv, idx).split([C, C], -1)  # B, R, topk, T, C
        k = k.reshape(B * R, topk * T, heads, D).permute(0, 2, 3, 1)
        v = v.reshape(B * R, topk * T, heads, D).transpose(1, 2)
        qh = q.reshape(B * R, T, heads, D).transpose(1, 2)
        attn = ((qh * scale) @ k).softmax(dim=-1)
        return attn @ v

    def gather_sdpa(q, kv, idx):
        k, v = _gather(kv, idx).split([C, C], -1)
        k = k.reshape(B * R, topk * T, heads, D).transpose(1, 2)
        v = v.reshape(B * R, topk * T, heads, D).transpose(1, 2)
        qh = q.reshape(B * R, T, heads, D).transpose(1, 2)
        return F.scaled_dot_product_attention(qh, k, v, scale=scale)

    def dense_inputs():
        return [torch.randn(B, heads, R * T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)]

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    methods = {
        "foveal": (ours_inputs, ours),
        "(a) gather": (gather_inputs, gather_explicit),
        "(b) gather+SDPA": (gather_inputs, gather_sdpa),
        "(d) dense SDPA": (dense_inputs, dense),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - old torch
        return methods
    flex = torch.compile(flex_attention, dynamic=False)
    for bs in block_sizes:
        def flex_inputs(bs=bs):
            routed = torch.zeros(B, R, R, device=device, dtype=torch.bool)
            routed.scatter_(2, routing(), True)

            def mask_mod(b, h, q_idx, kv_idx):
                return routed[b, q_idx // T, kv_idx // T]

            try:  # compiled mask construction: the eager one evaluates the mask densely (72 GiB at COCO size)
                mask = create_block_mask(mask_mod, B, None, R * T, R * T, device=device, BLOCK_SIZE=bs, _compile=True)
            except TypeError:  # pragma: no cover - a torch without the option
                mask = create_block_mask(mask_mod, B, None, R * T, R * T, device=device, BLOCK_SIZE=bs)
            return (*dense_inputs(), mask)

        def flex_run(q, k, v, mask):
            return flex(q, k, v, block_mask=mask, scale=scale)

        methods[f"(c) Flex block {bs}"] = (flex_inputs, flex_run)
    return methods


def bench_op(args, emit):
    for name, B, H, W, S, heads, D, topk in SHAPES:
        if args.quick and name not in QUICK:
            continue
        R, T = S * S, (H // S) * (W // S)
        scale = (heads * D) ** -0.5
        flops = 2 * B * heads * R * T * topk * T * 2 * D
        # compiled Flex specialises on every shape: past dynamo's recompile limit (8) the later shapes
        # would silently run its unfused fallback, so each shape starts from an empty cache
        torch._dynamo.reset()
        for label, (make, run) in _methods(B, R, T, heads, D, topk, scale, args.flex_blocks).items():
            record = dict(part="op", shape=name, batch=B, map=[H, W], n_win=S, heads=heads, topk=topk, method=label)
            try:
                inputs = make()
                leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
                grad = torch.randn_like(run(*inputs))

                def fwd():
                    with torch.no_grad():
                        run(*inputs)

                def fwd_bwd():
                    torch.autograd.grad(run(*inputs), leaves, grad)

                fwd_ms = do_bench(fwd, warmup=10, rep=args.rep, return_mode="median")
                ms = do_bench(fwd_bwd, warmup=10, rep=args.rep, return_mode="median")
                peak = _peak_bytes(fwd_bwd)
                record.update(fwd_ms=fwd_ms, ms=ms, tflops=2.5 * flops / ms / 1e9, peak_mib=peak / 2**20)
            except Exception as err:  # one failing peer (OOM, compile error) must not end the run
                record.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
            finally:
                inputs = leaves = grad = None
                torch.cuda.empty_cache()
            emit(record)


def _model_run(model, batch: int, size: int, train: bool, steps: int):
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3) if train else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if train:
                loss = F.cross_entropy(model(x), target)
            else:
                with torch.no_grad():
                    model(x)
                return
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train(train)
    for _ in range(3):  # warm-up (and compile)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def _build(name):
    if name == "official biformer_small":
        sys.path.insert(0, str(ROOT / "tests"))
        from biformer_official import OFFICIAL_VARIANTS, OfficialBiFormer
        return OfficialBiFormer(**OFFICIAL_VARIANTS["biformer_small"])
    return timm.create_model(name)


def _compile_modes(args):
    """The model part's compile settings: eager and compiled, eager only or compiled only."""
    if args.compiled_only:
        return (True,)
    return (False, True) if args.compile else (False,)


def bench_model(args, emit):
    names = ["biformer_small", "official biformer_small", "swin_tiny_patch4_window7_224"]
    for name in names:
        for compiled in _compile_modes(args):
            record = dict(part="model", model=name, compiled=compiled, batch=args.model_batch, size=224)
            try:
                torch.manual_seed(0)
                model = _build(name).cuda().to(memory_format=torch.channels_last)
                run = torch.compile(model) if compiled else model
                infer, _ = _model_run(run, args.model_batch, 224, False, args.steps)
                train, peak = _model_run(run, args.model_batch, 224, True, args.steps)
                record.update(infer_img_s=infer, train_img_s=train, train_peak_gib=peak)
            except Exception as err:
                record.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
            finally:
                model = run = None
                torch.cuda.empty_cache()
                torch._dynamo.reset()
            emit(record)


def _summary(ops):
    """Per shape: speed-up of foveal over the best peer, memory against (a) and (d)."""
    lines = ["| shape | foveal ms | best peer | peer ms | speed-up | mem / (a) | mem / (d) |",
             "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in ops):
        rows = {r["method"]: r for r in ops if r["shape"] == shape and "ms" in r}
        ours = rows.pop("foveal", None)
        if ours is None or not rows:
            continue
        best = min(rows.values(), key=lambda r: r["ms"])

        def ratio(label):
            r = rows.get(label)
            return f"{ours['peak_mib'] / r['peak_mib']:.2f}" if r and r["peak_mib"] else "n/a"

        lines.append(f"| {shape} | {ours['ms']:.3f} | {best['method']} | {best['ms']:.3f} | "
                     f"{best['ms'] / ours['ms']:.2f}x | {ratio('(a) gather')} | {ratio('(d) dense SDPA')} |")
    return lines


def _markdown(records) -> str:
    lines = []
    ops = [r for r in records if r["part"] == "op"]
    if ops:
        lines += ["| shape | B | map | n_win | heads | top-k | method | fwd ms | fwd+bwd ms | eff. TFLOP/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            head = (f"| {r['shape']} | {r['batch']} | {r['map'][0]}x{r['map'][1]} | {r['n_win']} | {r['heads']} | "
                    f"{r['topk']} | {r['method']} |")
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | |")
            else:
                lines.append(f"{head} {r['fwd_ms']:.3f} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['peak_mib']:.0f} |")
        lines += [""] + _summary(ops) + [""]
    models = [r for r in records if r["part"] == "model"]
    if models:
        lines += ["| model | compiled | infer img/s | train img/s | train peak GiB |", "|---|---|---|---|---|"]
        for r in models:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['compiled']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['model']} | {r['compiled']} | {r['infer_img_s']:.0f} | {r['train_img_s']:.0f} | "
                             f"{r['train_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="op,model", help="comma-separated: op, model")
    p.add_argument("--quick", action="store_true", help=f"op shapes {', '.join(QUICK)} only, batch 32 models, 5 steps")
    p.add_argument("--flex-blocks", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128],
                   help="FlexAttention block sizes to try")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time per op measurement (ms)")
    p.add_argument("--model-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model measurement")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--compiled-only", action="store_true", help="torch.compile only (no eager rows)")
    p.add_argument("--bwd", default=None, help="op part: foveal alone, once per backward form of one-region key "
                   "tiles, comma-separated: atomic, reverse (default: all methods, the op's own choice)")
    p.add_argument("--out", default=None, help="markdown table")
    p.add_argument("--json", default=None, help="one JSON line per measurement")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_routing.py needs a CUDA GPU")
    if args.quick:
        args.model_batch, args.steps = min(args.model_batch, 32), min(args.steps, 5)
    torch.backends.cudnn.benchmark = True
    records = []
    sink = open(args.json, "a") if args.json else None

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)
        if sink is not None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    start = time.perf_counter()
    parts = args.parts.split(",")
    if "op" in parts:
        if args.bwd is None:
            bench_op(args, emit)
        else:  # foveal alone, once per backward form of one-region key tiles (the op's private switch)
            from foveal.kernels import routing_triton
            default, methods = routing_triton._unpacked_bwd, _methods
            try:
                for form in args.bwd.split(","):
                    routing_triton._unpacked_bwd = lambda dense, form=form: form
                    globals()["_methods"] = lambda *a, form=form, **k: {f"foveal ({form})": methods(*a, **k)["foveal"]}
                    bench_op(args, emit)
            finally:
                routing_triton._unpacked_bwd = default
                globals()["_methods"] = methods
    if "model" in parts:
        bench_model(args, emit)
    table = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, "
             f"{time.perf_counter() - start:.0f} s\n\n" + _markdown(records))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

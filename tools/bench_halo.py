"""Halo-attention benchmark on one CUDA GPU: foveal's fused layer against timm's ``HaloAttn``.

Two parts, side by side in one run:

- ``op``: every distinct halo layer of a timm model (default ``halonet50ts`` at 256 px, batch 256),
  timm's layer against the same layer after ``foveal.accelerate`` (identical weights), forward and
  forward+backward, bf16 autocast, channels-last input. Times are ``triton.testing.do_bench``
  medians (warm-up, fresh random inputs per row); peak memory is the allocator's peak above the
  inputs for one forward+backward. Effective TFLOP/s count the attended pairs of the window:
  ``2 * B * heads * Nq * win^2 * (Dqk + Dv)`` forward, 2.5x that for forward+backward.
- ``model``: timm's ``halonet50ts`` and ``halonet26t`` before and after ``accelerate``, bf16
  autocast, batch 128, 256 px, channels-last, eager and ``torch.compile``: inference and training
  img/s (SGD step included) and peak training memory.

It writes a markdown table (``--out``) and one JSON line per measurement (``--json``).

Usage:
    python tools/bench_halo.py --out bench_halo.md [--json bench_halo.jsonl] [--parts op,model]
        [--op-model halonet50ts] [--op-batch 256] [--model-batch 128] [--no-compile | --compiled-only] [--bwd split,fused]
"""
import argparse
import copy
import json
import sys
import time

import timm
import torch
from timm.layers.halo_attn import HaloAttn
from triton.testing import do_bench

import foveal
from foveal.layers import HaloAttention2d


def _layer_shapes(model_name: str, size: int):
    """``[(name, layer, input shape without batch)]`` for the distinct halo layers of a timm model."""
    model = timm.create_model(model_name).eval()
    seen, rows = set(), []

    def hook(name):
        def fn(module, inputs, output):
            key = (module.q.in_channels, module.dim_out_v, module.block_stride, module.num_heads, module.dim_head_qk,
                   module.block_size, module.halo_size, isinstance(module.pool, torch.nn.AvgPool2d),
                   tuple(inputs[0].shape[1:]))
            if key not in seen:
                seen.add(key)
                rows.append((name, module, tuple(inputs[0].shape[1:])))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if type(m) is HaloAttn]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return rows


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _layer_flops(layer, batch: int, H: int, W: int) -> int:
    hq, wq = H // layer.block_stride, W // layer.block_stride
    return 2 * batch * layer.num_heads * hq * wq * layer.win_size ** 2 * (layer.dim_head_qk + layer.dim_head_v)


def bench_op(args, emit):
    rows = _layer_shapes(args.op_model, args.op_size)
    for name, layer, (C, H, W) in rows:
        timm_layer = copy.deepcopy(layer).cuda()
        fused = foveal.accelerate(copy.deepcopy(layer), verbose=False).cuda()
        assert type(fused) is HaloAttention2d
        flops = _layer_flops(layer, args.op_batch, H, W)
        for label, module in (("timm HaloAttn", timm_layer), ("foveal", fused)):
            x = torch.randn(args.op_batch, C, H, W, device="cuda").to(memory_format=torch.channels_last)
            x.requires_grad_(True)
            grad = None

            def fwd():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return module(x)

            def fwd_bwd():
                nonlocal grad
                out = fwd()
                if grad is None:
                    grad = torch.randn_like(out)
                out.backward(grad)

            for mode, fn, f in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 2.5 * flops)):
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                peak = _peak_bytes(fn) if mode == "fwd+bwd" else None
                emit(dict(part="op", layer=name, shape=[args.op_batch, C, H, W], block=layer.block_size,
                          halo=layer.halo_size, stride=layer.block_stride, heads=layer.num_heads, method=label,
                          mode=mode, ms=ms, tflops=f / ms / 1e9, peak_mib=None if peak is None else peak / 2**20))


def _model_run(model, batch: int, size: int, train: bool, steps: int):
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3) if train else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if train:
                loss = torch.nn.functional.cross_entropy(model(x), target)
            else:
                with torch.no_grad():
                    model(x)
                return
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train(train)
    for _ in range(5):  # warm-up (and compile)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return batch * steps / seconds, torch.cuda.max_memory_allocated() / 2**30


def _compile_modes(args):
    """The model part's compile settings: eager and compiled, eager only or compiled only."""
    if args.compiled_only:
        return (True,)
    return (False, True) if args.compile else (False,)


def bench_model(args, emit):
    for name in args.models.split(","):
        for variant in ("timm", "foveal.accelerate"):
            for compiled in _compile_modes(args):
                torch.manual_seed(0)
                model = timm.create_model(name).cuda().to(memory_format=torch.channels_last)
                if variant != "timm":
                    foveal.accelerate(model, verbose=False)
                run = torch.compile(model) if compiled else model
                infer, _ = _model_run(run, args.model_batch, args.model_size, False, args.steps)
                train, peak = _model_run(run, args.model_batch, args.model_size, True, args.steps)
                emit(dict(part="model", model=name, variant=variant, compiled=compiled, batch=args.model_batch,
                          size=args.model_size, infer_img_s=infer, train_img_s=train, train_peak_gib=peak))
                del model, run
                torch.cuda.empty_cache()
                torch._dynamo.reset()


def _markdown(records) -> str:
    lines = []
    ops = [r for r in records if r["part"] == "op"]
    if ops:
        lines += ["| layer | B,C,H,W | b/h/s | heads | method | mode | ms | eff. TFLOP/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['layer']} | {','.join(map(str, r['shape']))} | {r['block']}/{r['halo']}/{r['stride']} | "
                         f"{r['heads']} | {r['method']} | {r['mode']} | {r['ms']:.3f} | {r['tflops']:.1f} | {peak} |")
        lines.append("")
    models = [r for r in records if r["part"] == "model"]
    if models:
        lines += ["| model | variant | compiled | infer img/s | train img/s | train peak GiB |", "|---|---|---|---|---|---|"]
        for r in models:
            lines.append(f"| {r['model']} | {r['variant']} | {r['compiled']} | {r['infer_img_s']:.0f} | "
                         f"{r['train_img_s']:.0f} | {r['train_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="op,model", help="comma-separated: op, model")
    p.add_argument("--op-model", default="halonet50ts", help="timm model whose halo layers the op part times")
    p.add_argument("--op-size", type=int, default=256)
    p.add_argument("--op-batch", type=int, default=256)
    p.add_argument("--models", default="halonet50ts,halonet26t")
    p.add_argument("--model-size", type=int, default=256)
    p.add_argument("--model-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model measurement")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--compiled-only", action="store_true", help="torch.compile only (no eager rows)")
    p.add_argument("--bwd", default=None, help="op part once per backward form, comma-separated: split, fused "
                   "(default: the op's own choice)")
    p.add_argument("--out", default=None, help="markdown table")
    p.add_argument("--json", default=None, help="one JSON line per measurement")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_halo.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    records = []
    sink = open(args.json, "a") if args.json else None

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)
        if sink is not None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    parts = args.parts.split(",")
    if "op" in parts:
        if args.bwd is None:
            bench_op(args, emit)
        else:  # each backward form in turn (the op's private switch, as the tests force it)
            import foveal.kernels.halo_triton as halo_triton
            default = halo_triton._fused_bwd
            try:
                for form in args.bwd.split(","):
                    halo_triton._fused_bwd = lambda programs, block, halo, fused=form == "fused": fused
                    bench_op(args, lambda record, form=form: emit(dict(record, bwd=form,
                                                                        method=f"{record['method']} ({form})")))
            finally:
                halo_triton._fused_bwd = default
    if "model" in parts:
        bench_model(args, emit)
    table = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}\n\n" + _markdown(records)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

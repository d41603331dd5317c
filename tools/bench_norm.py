#!/usr/bin/env python3
"""Fused residual add + LayerNorm (``foveal.kernels.add_layer_norm``) against the unfused PyTorch
path, at the NAT-T stage shapes on one CUDA GPU.

Both paths get what a NAT block under bf16 autocast has (the residual stream ``x`` float32, the
branch output ``y`` bfloat16, LayerNorm ``weight`` and ``bias`` float32) and produce what the next
Linear consumes:

- unfused: ``s = x + y``, ``h = F.layer_norm(s, ...)`` under ``torch.autocast(device, bfloat16)``
  (PyTorch runs it in float32), then ``h.to(torch.bfloat16)``, the cast the Linear would do;
- fused: ``h, s = add_layer_norm(x, y, weight, bias)`` under the same autocast (``h`` bfloat16).

The run checks correctness on the device first: the max relative error (``max |fused - unfused|
/ max |unfused|``) of ``h``, ``s`` and the gradients of ``x``, ``y``, ``weight`` and ``bias``,
given random ``grad_h`` (bfloat16) and ``grad_s`` (float32). Then it times the forward alone
(no grad, as in inference) and forward+backward as GPU time, replays of a captured CUDA graph
(``triton.testing.do_bench_cudagraph``, median; no launch gaps, so a path's host time does not
hide in it), and reports ms, achieved GB/s and the speed-up (unfused ms / fused ms). The last two
columns are the eager wall time per call (``triton.testing.do_bench``): at small shapes that is
host time, which the model-level benchmarks account for.

GB/s count the minimal bytes per element: the forward reads ``x`` (4) and ``y`` (2) and writes
``s`` (4) and ``h`` (2), 12 B; the backward reads ``grad_h`` (2), ``grad_s`` (4) and ``s`` (4) and
writes ``dx`` (4) and ``dy`` (2), 16 B; fwd+bwd 28 B. Weight, bias and per-row statistics are
negligible and not counted.

``--device cpu`` runs the script in Triton's interpreter at a tiny shape: a smoke test of the
script, timed by the wall clock; its numbers say nothing about speed.

Usage:
    python tools/bench_norm.py [--out bench_norm.md]
    python tools/bench_norm.py --device cpu
"""
import argparse
import os
import statistics
import sys
import time

NAT_T_SHAPES = "128,56,56,64;128,28,28,128;128,14,14,256;128,7,7,512"
CPU_SHAPES = "2,3,5,64"
FWD_BYTES, BWD_BYTES = 12, 16  # per element, see the module docstring


def _shapes(text: str):
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu: Triton's interpreter, a smoke test")
    parser.add_argument("--shapes", help=f"B,H,W,C;... (default: {NAT_T_SHAPES} on cuda, {CPU_SHAPES} on cpu)")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels accept CPU tensors

    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from foveal.kernels import add_layer_norm

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (--device cpu runs the interpreter smoke test)")
    dev = torch.device(args.device)
    shapes = _shapes(args.shapes or (NAT_T_SHAPES if dev.type == "cuda" else CPU_SHAPES))
    bf16 = torch.bfloat16

    def unfused(x, y, w, b):
        with torch.autocast(dev.type, dtype=bf16):
            s = x + y
            h = F.layer_norm(s, (s.shape[-1],), w, b, 1e-5)
        return h.to(bf16), s

    def fused(x, y, w, b):
        with torch.autocast(dev.type, dtype=bf16):
            h, s = add_layer_norm(x, y, w, b, backend="triton")
        return h, s

    def fwd_bwd(fn, leaves, grads):
        h, s = fn(*leaves)
        return torch.autograd.grad((h, s), leaves, grads)

    def bench(fn, graph=True) -> float:
        # GPU time: replays of a captured CUDA graph (no launch gaps); eager: wall time of plain calls
        if dev.type == "cuda":
            if graph:
                return do_bench_cudagraph(fn, rep=100, return_mode="median")
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"{device_name}; torch {torch.__version__}, Triton {triton.__version__}; "
             f"command: python tools/bench_norm.py {' '.join(argv if argv is not None else sys.argv[1:])}", ""]
    errors = ["| shape (B, H, W, C) | h | s | dx | dy | dweight | dbias |", "|---|---:|---:|---:|---:|---:|---:|"]
    times = ["| shape (B, H, W, C) | pass | unfused ms | fused ms | unfused GB/s | fused GB/s | speed-up | "
             "unfused eager ms | fused eager ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        C = shape[-1]
        x = torch.randn(shape, device=dev)
        y = torch.randn(shape, device=dev, dtype=bf16)
        w = 1 + 0.1 * torch.randn(C, device=dev)
        b = 0.1 * torch.randn(C, device=dev)
        grads = (torch.randn(shape, device=dev, dtype=bf16), torch.randn(shape, device=dev))
        leaves = [t.clone().requires_grad_() for t in (x, y, w, b)]

        outs = {}
        for name, fn in (("unfused", unfused), ("fused", fused)):
            h, s = fn(*leaves)
            outs[name] = [h, s, *torch.autograd.grad((h, s), leaves, grads)]
        rel = [((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
               for a, r in zip(outs["fused"], outs["unfused"])]
        errors.append(f"| {shape} | " + " | ".join(f"{e:.1e}" for e in rel) + " |")
        del outs

        def fwd_only(fn, graph=True):
            def run():
                with torch.no_grad():
                    fn(x, y, w, b)
            return bench(run, graph)

        def fwd_and_bwd(fn, graph=True):
            # fresh leaves (views, no kernel) per call: autograd then runs on the stream being captured
            return bench(lambda: fwd_bwd(fn, [t.detach().requires_grad_() for t in leaves], grads), graph)

        numel = x.numel()
        for label, per_elem, timer in (("fwd", FWD_BYTES, fwd_only), ("fwd+bwd", FWD_BYTES + BWD_BYTES, fwd_and_bwd)):
            ms_unfused, ms_fused = timer(unfused), timer(fused)
            gbs = [numel * per_elem / (ms * 1e-3) / 1e9 for ms in (ms_unfused, ms_fused)]
            eager = [timer(fn, False) for fn in (unfused, fused)] if dev.type == "cuda" else [ms_unfused, ms_fused]
            times.append(f"| {shape} | {label} | {ms_unfused:.4f} | {ms_fused:.4f} | {gbs[0]:.0f} | {gbs[1]:.0f} | "
                         f"{ms_unfused / ms_fused:.2f}x | {eager[0]:.4f} | {eager[1]:.4f} |")

    text = "\n".join(lines + ["Max relative error, fused vs unfused:", ""] + errors + [""] + times) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

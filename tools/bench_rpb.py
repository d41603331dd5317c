#!/usr/bin/env python3
"""Cost of the relative positional bias at the four NAT-T stage shapes, forward+backward, on a GPU.

For each stage of NAT-T at 224 px (batch 128, head dim 32, kernel 7: 56x56 with 2 heads, 28x28
with 4, 14x14 with 8, 7x7 with 16) it times one ``na2d`` forward+backward on bf16 slices of one qkv
tensor, as the model calls it, replayed from a CUDA graph (GPU time, no host overhead), with and
without an ``nn.Parameter`` bias, and prints the ratio. It also checks the bf16 kernel's bias
gradient against the reference backend in float32 on the same inputs (max error relative to the
largest entry).

    python tools/bench_rpb.py
"""
import argparse
import sys

import torch
from triton.testing import do_bench

from foveal.kernels import na2d

STAGES = ((56, 2), (28, 4), (14, 8), (7, 16))


def _graph_ms(fn) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", "-b", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, bf16, D32, kernel 7")
    print("\n| stage map | heads | fwd+bwd ms, no RPB | with RPB | RPB / no RPB | dRPB max rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for size, heads in STAGES:
        qkv = torch.randn(args.batch_size, size, size, 3, heads, 32, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)
        rpb = torch.nn.Parameter(0.02 * torch.randn(heads, 13, 13, device="cuda"))
        grad = torch.randn(args.batch_size, size, size, heads, 32, device="cuda", dtype=torch.bfloat16)
        ms = {}
        for with_rpb in (False, True):
            def step():
                q, k, v = qkv.unbind(3)
                torch.autograd.backward(na2d(q, k, v, 7, rpb=rpb if with_rpb else None), grad)
            ms[with_rpb] = _graph_ms(step)
        got, ref = (rpb.detach().clone().requires_grad_() for _ in range(2))
        q, k, v = qkv.detach().unbind(3)
        na2d(q, k, v, 7, rpb=got).float().backward(grad.float())
        q, k, v = qkv.detach().float().unbind(3)
        na2d(q, k, v, 7, rpb=ref, backend="reference").backward(grad.float())
        err = ((got.grad - ref.grad).abs().max() / ref.grad.abs().max()).item()
        print(f"| {size}x{size} | {heads} | {ms[False]:.4f} | {ms[True]:.4f} | {ms[True] / ms[False]:.2f}x | {err:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

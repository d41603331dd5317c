#!/usr/bin/env python3
"""Where a model's step time goes on a GPU: wall time against GPU-busy time, and the top kernels.

    python tools/profile_model.py --models nat_tiny swin_tiny_patch4_window7_224 --modes infer train

Runs a few warm-up steps, then profiles ``--steps`` steps with ``torch.profiler`` (CUDA activity)
in the same set-up as ``tools/benchmark.py`` (bf16 autocast, channels-last, random inputs, AdamW
for training). Reports per step: wall time, the time some kernel was running on the GPU (the union
of kernel intervals), the share of the wall the GPU was idle (host bound when large), and the
kernels grouped by name with their total time and call count. ``--compile`` profiles the
``torch.compile``-d model. ``--host`` adds where the host time goes: the wall time per step without
the profiler, and a ``cProfile`` of the steps (the Python functions with the most own time per step,
C functions such as kernel launches included). ``--ops`` adds the host side of the profiled steps:
the operators (aten ops, autograd nodes, kernel launches) with the most own CPU time per step.
"""
import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict

import torch

import timm

import foveal  # noqa: F401  (registers the models)


def _busy_us(events) -> float:
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def profile(name: str, mode: str, args) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().to(memory_format=torch.channels_last)
    net = torch.compile(model, mode=None if args.compile == "default" else args.compile) if args.compile else model
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(args.batch_size, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                net(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randint(0, model.num_classes, (args.batch_size,), device="cuda")

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(x).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _busy_us(kernels) / args.steps
    total, count = defaultdict(float), defaultdict(int)
    for e in kernels:
        key = e.name[:90]
        total[key] += e.time_range.end - e.time_range.start
        count[key] += 1
    lines = [f"### {name} {mode}{' compiled ' + args.compile if args.compile else ''}, batch {args.batch_size}",
             "", f"wall {wall / 1e3:.2f} ms/step, GPU busy {busy / 1e3:.2f} ms/step, "
             f"GPU idle {100 * (1 - busy / wall):.0f}% of the wall, {len(kernels) / args.steps:.0f} kernels/step", "",
             "| kernel | ms/step | calls/step |", "|---|---:|---:|"]
    for key in sorted(total, key=total.get, reverse=True)[:args.top]:
        lines.append(f"| `{key}` | {total[key] / args.steps / 1e3:.3f} | {count[key] / args.steps:.0f} |")
    if args.ops:
        lines += ["", "host operators (own CPU time under torch.profiler, which inflates it):", "",
                  "| operator | own CPU ms/step | calls/step |", "|---|---:|---:|"]
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        for e in ops[:args.top]:
            lines.append(f"| `{e.key[:90]}` | {e.self_cpu_time_total / args.steps / 1e3:.3f} | {e.count / args.steps:.0f} |")
    if args.host:
        lines += ["", *_host_lines(step, args)]
    return "\n".join(lines) + "\n"


def _host_lines(step, args) -> list:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    own = sum(v[2] for v in stats.values()) / args.steps * 1e3
    lines = [f"host: wall {wall:.2f} ms/step without the profiler; under cProfile {own:.1f} ms/step of host "
             "time (cProfile roughly doubles Python's own cost)", "",
             "| function | own ms/step | cumulative ms/step | calls/step |", "|---|---:|---:|---:|"]
    for (file, line, name), (calls, _, tt, ct, _) in rows[:args.top]:
        where = name if file == "~" else f"{file.rsplit('/', 2)[-2] if '/' in file else ''}/{file.rsplit('/', 1)[-1]}:{line} {name}"
        lines.append(f"| `{where[:90]}` | {tt / args.steps * 1e3:.2f} | {ct / args.steps * 1e3:.2f} | "
                     f"{calls / args.steps:.0f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--modes", nargs="+", default=["infer"], choices=("infer", "train"))
    p.add_argument("--batch-size", "-b", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE")
    p.add_argument("--host", action="store_true", help="also the wall without the profiler and a cProfile of the steps")
    p.add_argument("--ops", action="store_true", help="also the operators with the most own CPU time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for name in args.models:
        for mode in args.modes:
            print(profile(name, mode, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

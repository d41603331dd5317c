#!/usr/bin/env python3
"""Inference and training throughput, step time and peak memory of timm models (foveal's included).

    python tools/benchmark.py --models nat_tiny dinat_tiny swin_tiny_patch4_window7_224 convnext_tiny \\
        --device cuda --batch-size 128 --dtype bfloat16 --channels-last --section nat-vs-peers-h100
    python tools/benchmark.py --models nat_nano resnet18 --device cpu --img-size 28 --in-chans 1 \\
        --num-classes 10 --batch-size 128 --section cpu-fashion-mnist

Each model is timed on random inputs after a warm-up: inference (forward under ``torch.no_grad``)
and training (forward, backward and an AdamW step), in the chosen dtype (autocast for bfloat16 /
float16), optionally channels-last and ``torch.compile``-d. Step times are medians over
``--iters`` steps (CUDA events on GPU). Peak memory is ``torch.cuda.max_memory_allocated`` on GPU;
on CPU it is the growth of the peak resident set of a child process that runs only that
measurement. The results go to a markdown table in one section of ``--out`` (default
``docs/benchmarks.md``), between ``<!-- benchmark.py:begin NAME -->`` and
``<!-- benchmark.py:end NAME -->``, with the command line, the device and the versions; other
sections of the file are left as they are. With matplotlib installed a PNG bar chart is written
beside it and linked from the section.
"""
import argparse
import datetime
import multiprocessing
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import timm

import foveal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="timm model names")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=("infer", "train"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: each model's)")
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fused-optimizer", action="store_true",
                   help="AdamW(fused=True): one kernel for all parameters (default: torch's foreach AdamW)")
    p.add_argument("--no-isolate", action="store_true",
                   help="on CPU, measure in this process (faster; no peak memory)")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file holding the section")
    p.add_argument("--section", default=None, help="section name (default: derived from device, dtype, batch)")
    p.add_argument("--title", default=None, help="heading of the section")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true")
    return p


# -- one measurement ------------------------------------------------------------------------------

def _build(args, name, device):
    kwargs = {}
    for key in ("in_chans", "num_classes"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.img_size is not None:
        try:
            model = timm.create_model(name, img_size=args.img_size, **kwargs)
        except TypeError:  # models without a fixed input size take any size
            model = timm.create_model(name, **kwargs)
    else:
        model = timm.create_model(name, **kwargs)
    c, h, w = model.pretrained_cfg["input_size"]
    size = (args.in_chans or c, args.img_size or h, args.img_size or w)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, size


def _timer(device):
    if device.type == "cuda":
        def run(step, n):
            times = []
            for _ in range(n):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            return times
    else:
        def run(step, n):
            times = []
            for _ in range(n):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            return times
    return run


def measure(args, name: str, mode: str) -> dict:
    """Time one (model, mode); returns params, input size, step time, img/s and peak memory."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, size = _build(args, name, device)
    params = sum(p.numel() for p in model.parameters())
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if args.compile:
        # a new model (and grad mode) is one more cache entry of the same code objects: without a
        # reset, a sweep in one process reaches dynamo's recompile limit and later models run eagerly
        torch._dynamo.reset()
    net = torch.compile(model, mode=None if args.compile == "default" else args.compile) if args.compile else model
    x = torch.randn(args.batch_size, *size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                net(x)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if args.fused_optimizer else None)
        target = torch.randint(0, model.num_classes or 1, (args.batch_size,), device=device)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(net(x).float(), target)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

    run = _timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    run(step, args.warmup)
    times = run(step, args.iters)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(model=name, mode=mode, params=params, input_size=size, batch=args.batch_size,
                step_ms=seconds * 1e3, img_s=args.batch_size / seconds, peak_mib=peak)


def _child(args, name, mode, conn):
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        base = _rss_mib()
        result = measure(args, name, mode)
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        conn.send(result)
    except BaseException as e:  # the parent reports it
        conn.send(e)
    finally:
        conn.close()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_isolated(args, name: str, mode: str) -> dict:
    """On CPU each measurement runs in a fresh child process, so its peak RSS is its own (a forked
    child would inherit the parent's OpenMP pool, which is not fork-safe)."""
    if args.device != "cpu" or args.no_isolate or not sys.platform.startswith("linux"):
        return measure(args, name, mode)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(args, name, mode, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


# -- report ---------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads > 1 else ''}"


def markdown_table(rows) -> str:
    lines = ["| model | params (M) | mode | batch | input | img/s | ms / step | peak memory (MiB) |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['mode']} | | | failed: {r['error']} | | |")
            continue
        mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        size = "x".join(str(s) for s in r["input_size"])
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['mode']} | {r['batch']} | {size} | "
                     f"{r['img_s']:.1f} | {r['step_ms']:.2f} | {mem} |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "error" not in r]
    modes = sorted({r["mode"] for r in ok})
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 0.5 * len(models) + 1.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        values = {r["model"]: r["img_s"] for r in ok if r["mode"] == mode}
        names = [m for m in models if m in values]
        ax.barh(names, [values[m] for m in names])
        ax.invert_yaxis()
        ax.set_xlabel("images / s")
        ax.set_title(mode)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_section(out: Path, name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of ``out``, leaving the rest of the file alone."""
    begin, end = f"<!-- benchmark.py:begin {name} -->", f"<!-- benchmark.py:end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for mode in args.modes:
            try:
                r = measure_isolated(args, name, mode)
            except Exception as e:  # one failing model does not lose the others' numbers
                r = dict(model=name, mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            rows.append(r)
            if "error" in r:
                print(f"{name:<32} {mode:<5} FAILED {r['error']}", flush=True)
            else:
                mem = "" if r["peak_mib"] is None else f"  peak {r['peak_mib']:.0f} MiB"
                print(f"{name:<32} {mode:<5} {r['img_s']:9.1f} img/s  {r['step_ms']:8.2f} ms/step{mem}", flush=True)
    table = markdown_table(rows)
    print(table)
    if args.no_write:
        return rows

    section = args.section or f"{args.device.split(':')[0]}-{args.dtype}-b{args.batch_size}"
    title = args.title or f"{', '.join(args.modes)}: batch {args.batch_size}, {args.dtype}" + \
        (", channels-last" if args.channels_last else "") + (f", torch.compile({args.compile})" if args.compile else "")
    out = Path(args.out)
    command = "python tools/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"### {title}",
        "",
        f"Device: {device_name(args.device)}. torch {torch.__version__}, timm {timm.__version__}, "
        f"foveal {foveal.__version__}. {datetime.date.today().isoformat()}. Median of {args.iters} steps "
        f"after {args.warmup} warm-up steps; training = forward + backward + "
        f"{'fused ' if args.fused_optimizer else ''}AdamW step.",
        "",
        "```bash",
        command,
        "```",
        "",
        table,
    ]
    png = out.parent / "benchmarks" / f"{section}.png"
    if not args.no_plot and plot(rows, png, title):
        lines += ["", f"![{title}]({os.path.relpath(png, out.parent)})"]
    write_section(out, section, "\n".join(lines))
    print(f"wrote section {section!r} of {out}")
    return rows


if __name__ == "__main__":
    main()

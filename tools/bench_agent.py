"""Agent attention benchmark on one CUDA GPU: foveal's agent_attention op against its peers.

Parts (``--parts``, a comma-separated list of the keys of ``PARTS``):

- ``op``: the agent-attention core (both stages, biases composed per head), bf16, forward and
  forward+backward (gradients of q, k, v, agents and both bias tables), at five shapes: Agent-Swin-T
  stages 1-3 at 224 with batch 128, Agent-Swin-T stage 1 at COCO size (200x336, batch 2, 81 agents)
  and Agent-PVT-S stage 1 (56x56, C64, one head, batch 128). Methods, all on the same tensors:
  foveal ``agent_attention`` (reading heads-first tensors through transposed views, in place) and
  two peers written here: (i) the official formulation (bias tables ``.repeat``-ed per batch
  element, explicit softmax, matmuls); (ii) two SDPA calls with float masks broadcast over the
  batch. Times are ``triton.testing.do_bench`` medians; peak memory is the allocator's peak above
  the inputs for one forward+backward. The run also checks foveal against (i) on the same inputs
  (max abs error of the output, printed and recorded).

Every case runs on its own: an out-of-memory error is recorded as an error row and the run goes on.
It writes a markdown table (``--out``) and one JSON line per measurement (``--json``).

Usage:
    python tools/bench_agent.py --out bench_agent.md [--json bench_agent.jsonl] [--parts op] [--rep 50]
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from foveal.kernels import agent_attention

# (name, batch, map H, map W, channels, heads, agents)
SHAPES = [
    ("swin-s1@224", 128, 56, 56, 96, 3, 9),
    ("swin-s2@224", 128, 28, 28, 192, 6, 16),
    ("swin-s3@224", 128, 14, 14, 384, 12, 49),
    ("swin-s1@coco", 2, 200, 336, 96, 3, 81),
    ("pvt-s1@224", 128, 56, 56, 64, 1, 9),
]


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _inputs(B, N, heads, D, n, device="cuda"):
    """Heads-first ``q, k, v [B, heads, N, D]``, ``agents [B, heads, n, D]`` and the composed bias
    tables ``[heads, n, N]``, ``[heads, N, n]``, bf16, all requiring gradients."""
    def t(*shape, std=1.0):
        return (std * torch.randn(*shape, device=device)).to(torch.bfloat16).requires_grad_()
    return (t(B, heads, N, D), t(B, heads, N, D), t(B, heads, N, D), t(B, heads, n, D),
            t(heads, n, N, std=0.5), t(heads, N, n, std=0.5))


def foveal(q, k, v, agents, bias_ak, bias_qa, scale):
    out = agent_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), agents.transpose(1, 2),
                          bias_ak, bias_qa, scale)
    return out.transpose(1, 2)


def official(q, k, v, agents, bias_ak, bias_qa, scale):
    B = q.shape[0]
    attn = torch.softmax((agents * scale) @ k.transpose(-2, -1) + bias_ak[None].repeat(B, 1, 1, 1), dim=-1)
    va = attn @ v
    attn = torch.softmax((q * scale) @ agents.transpose(-2, -1) + bias_qa[None].repeat(B, 1, 1, 1), dim=-1)
    return attn @ va


def sdpa(q, k, v, agents, bias_ak, bias_qa, scale):
    va = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias_ak[None], scale=scale)
    return F.scaled_dot_product_attention(q, agents, va, attn_mask=bias_qa[None], scale=scale)


METHODS = {"foveal": foveal, "(i) official": official, "(ii) 2x SDPA": sdpa}


def bench_op(args, emit):
    for name, B, H, W, C, heads, n in SHAPES:
        N, D = H * W, C // heads
        scale = D ** -0.5
        flops = 4 * B * heads * N * n * 2 * D
        torch.manual_seed(0)
        inputs = _inputs(B, N, heads, D, n)
        try:
            with torch.no_grad():
                ref = official(*inputs, scale).float()
                err = (foveal(*inputs, scale).float() - ref).abs().max().item()
            ref = None
        except Exception as e:  # noqa: BLE001 - the peer may run out of memory
            err = f"{type(e).__name__}"
        print(f"{name}: max abs err foveal vs official = {err}", flush=True)
        grad = torch.randn(B, heads, N, D, device="cuda", dtype=torch.bfloat16)
        for label, run in METHODS.items():
            record = dict(part="op", shape=name, batch=B, map=[H, W], channels=C, heads=heads, agents=n,
                          method=label, max_abs_err_vs_official=err if label == "foveal" else None)
            try:
                def fwd():
                    with torch.no_grad():
                        run(*inputs, scale)

                def fwd_bwd():
                    torch.autograd.grad(run(*inputs, scale), inputs, grad)

                fwd_ms = do_bench(fwd, warmup=10, rep=args.rep, return_mode="median")
                ms = do_bench(fwd_bwd, warmup=10, rep=args.rep, return_mode="median")
                peak = _peak_bytes(fwd_bwd)
                record.update(fwd_ms=fwd_ms, ms=ms, tflops=3 * flops / ms / 1e9, peak_mib=peak / 2**20)
            except Exception as e:  # noqa: BLE001 - one failing peer (OOM) must not end the run
                record.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            finally:
                torch.cuda.empty_cache()
            emit(record)
        inputs = grad = None
        torch.cuda.empty_cache()


PARTS = {"op": bench_op}


def _summary(ops):
    """Per shape: speed-up of foveal over the better peer (fwd+bwd), memory against the lesser."""
    lines = ["| shape | foveal fwd+bwd ms | better peer | peer ms | speed-up | foveal MiB | lesser peer MiB | "
             "mem ratio | max abs err |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in ops):
        rows = {r["method"]: r for r in ops if r["shape"] == shape and "ms" in r}
        ours = rows.pop("foveal", None)
        if ours is None or not rows:
            continue
        best = min(rows.values(), key=lambda r: r["ms"])
        least = min(r["peak_mib"] for r in rows.values())
        lines.append(f"| {shape} | {ours['ms']:.3f} | {best['method']} | {best['ms']:.3f} | "
                     f"{best['ms'] / ours['ms']:.2f}x | {ours['peak_mib']:.0f} | {least:.0f} | "
                     f"{ours['peak_mib'] / least:.2f} | {ours['max_abs_err_vs_official']} |")
    return lines


def _markdown(records) -> str:
    lines = []
    ops = [r for r in records if r["part"] == "op"]
    if ops:
        lines += ["| shape | B | map | heads | agents | method | fwd ms | fwd+bwd ms | eff. TFLOP/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            head = (f"| {r['shape']} | {r['batch']} | {r['map'][0]}x{r['map'][1]} | {r['heads']} | {r['agents']} | "
                    f"{r['method']} |")
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | |")
            else:
                lines.append(f"{head} {r['fwd_ms']:.3f} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['peak_mib']:.0f} |")
        lines += [""] + _summary(ops) + [""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="op", help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--out", default=None, help="markdown table")
    p.add_argument("--json", default=None, help="one JSON line per measurement")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_agent.py needs a CUDA GPU")
    parts = args.parts.split(",")
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        sys.exit(f"unknown parts {unknown}; expected some of {list(PARTS)}")
    records = []
    sink = open(args.json, "a") if args.json else None

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)
        if sink is not None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    start = time.perf_counter()
    for part in parts:
        PARTS[part](args, emit)
    table = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s\n\n"
             + _markdown(records))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

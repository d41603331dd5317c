#!/usr/bin/env python3
"""Host (CPU-side) time of one neighborhood-attention call, the cost that makes eager models with
tens of NA layers host bound.

Times ``na2d`` on a tiny map (so the GPU, when there is one, finishes long before the host issues
the next call) through the paths a model takes: inference (no autograd node), forward+backward
through the eager autograd path, and the same through the ``foveal::na_fwd`` custom-op dispatcher.
The bias is an ``nn.Parameter``, as in the NAT/DiNAT layers. Beside each figure it times torch's
``F.scaled_dot_product_attention`` on the same q, k, v (heads first, as SDPA takes them): machines
differ up to 3x in host speed, the ratio much less.

``--device cpu`` (the default) replaces the Triton kernel launches by no-ops, so what is timed is
foveal's own Python and PyTorch's dispatch, on any machine (SDPA runs its CPU kernel, tiny here).
``--device cuda`` launches the real kernels and times the wall clock of many calls followed by one
synchronize.

    python tools/bench_host.py                   # CPU, kernel launches stubbed
    python tools/bench_host.py --device cuda     # real launches on a GPU
    python tools/bench_host.py --device cuda --blocks   # also whole NAT and Swin blocks
"""
import argparse
import os
import sys
import timeit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default="1,7,7,2,32", help="B,H,W,heads,head_dim (default: 1,7,7,2,32)")
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--dilation", type=int, default=2)
    parser.add_argument("--number", type=int, default=200, help="calls per timing (default: 200)")
    parser.add_argument("--repeat", type=int, default=9, help="timings; the fastest is reported (default: 9)")
    parser.add_argument("--blocks", action="store_true",
                        help="also one NAT block (one autograd node, and its modules) beside one timm Swin block "
                             "on a tiny map, forward and forward+backward under bf16 autocast")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend accepts CPU tensors; launches are stubbed below
    import torch
    import foveal.kernels.neighborhood as nbh
    import foveal.kernels.neighborhood_triton as nt
    from foveal.kernels import na2d

    if args.device == "cpu":
        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *a, **kw: None

        import foveal.kernels.norm_triton as nm
        for launcher in (nt._FWD, nt._DQ, nt._DKDV, nt._TABLE, nm._FWD, nm._BWD):
            launcher.fn = _NoLaunch()
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")

    B, H, W, heads, D = (int(x) for x in args.shape.split(","))
    ks, dil = args.kernel_size, args.dilation
    dev = torch.device(args.device)
    qkv = torch.randn(B, H, W, 3, heads, D, device=dev, requires_grad=True)
    q, k, v = qkv.unbind(3)
    rpb = torch.nn.Parameter(torch.randn(heads, 2 * ks - 1, 2 * ks - 1, device=dev))
    grad = torch.randn(B, H, W, heads, D, device=dev)
    sdpa_qkv = torch.randn(3, B, heads, H * W, D, device=dev, requires_grad=True)
    sq, sk, sv = sdpa_qkv.unbind(0)
    sdpa_grad = torch.randn(B, heads, H * W, D, device=dev)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_infer():
        with torch.no_grad():
            sdpa(sq, sk, sv)

    def sdpa_train():
        sdpa(sq, sk, sv).backward(sdpa_grad)

    def infer():
        with torch.no_grad():
            na2d(q, k, v, ks, dil, rpb=rpb, backend="triton")

    def train():
        na2d(q, k, v, ks, dil, rpb=rpb, backend="triton").backward(grad)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    def host_us(fn) -> float:
        for _ in range(20):
            fn()
        sync()

        def run():
            for _ in range(args.number):
                fn()
            sync()

        return min(timeit.repeat(run, number=1, repeat=args.repeat)) / args.number * 1e6

    infer_custom_op = _forced_custom_op(nbh, infer)
    train_custom_op = _forced_custom_op(nbh, train)
    sdpa_fwd, sdpa_fb = host_us(sdpa_infer), host_us(sdpa_train)
    rows = [
        ("forward, no grad", host_us(infer), sdpa_fwd),
        ("forward, no grad, custom-op dispatcher", host_us(infer_custom_op), sdpa_fwd),
        ("forward+backward, eager path", host_us(train), sdpa_fb),
        ("forward+backward, custom-op dispatcher", host_us(train_custom_op), sdpa_fb),
    ]

    parts = _engine_rows(dev, nbh, q, k, v, rpb, grad, ks, dil, host_us)
    blocks = _block_rows(dev, host_us) if args.blocks else []

    launches = "stubbed (no-op)" if dev.type == "cpu" else "real"
    print(f"device {args.device}, kernel launches {launches}, q/k/v [{B}, {H}, {W}, {heads}, {D}] "
          f"(slices of one qkv tensor), kernel_size {ks}, dilation {dil}, rpb nn.Parameter; "
          f"torch {torch.__version__}; fastest of {args.repeat} x {args.number} calls")
    print("\n| path | NA host us / call | SDPA host us / call | NA / SDPA |\n|---|---:|---:|---:|")
    for label, us, ref in rows:
        print(f"| {label} | {us:.1f} | {ref:.1f} | {us / ref:.2f}x |")
    print("\n| where a forward+backward goes | host us / call |\n|---|---:|")
    for label, us in parts:
        print(f"| {label} | {us:.1f} |")
    if blocks:
        print("\n| block, 2x14x14x256, 8 heads, window 7, bf16 autocast | host us / call |\n|---|---:|")
        for label, us in blocks:
            print(f"| {label} | {us:.1f} |")
    return 0


def _engine_rows(dev, nbh, q, k, v, rpb, grad, ks, dil, host_us) -> list:
    """The parts of an NA forward+backward: the backend's forward and backward called directly (no
    autograd), and the autograd engine's own cost for one node, a Python ``autograd.Function`` (as
    the NA op's eager path records) against a C++ one (an aten op), on the same tiny tensor. On a
    GPU the engine runs backward nodes on a device thread, which a Python node must hand the GIL to."""
    import torch
    from foveal.kernels.neighborhood import resolve_call

    name, *na_args = resolve_call(q, k, v, ks, dil, 1, False, rpb, None, "triton", 2)
    backend = nbh.NA_BACKENDS[name]

    def direct():
        out, lse = backend.fwd(q.detach(), k.detach(), v.detach(), rpb.detach(), *na_args)
        backend.bwd(grad, q.detach(), k.detach(), v.detach(), rpb.detach(), out, lse, None, *na_args)

    class _Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.randn(8, device=dev, requires_grad=True)
    gx = torch.ones(8, device=dev)
    python_node = host_us(lambda: _Twice.apply(x).backward(gx))
    aten_node = host_us(lambda: (x * 2).backward(gx))
    return [("NA forward then backward, backends called directly (no autograd)", host_us(direct)),
            ("autograd: x * 2 as a Python autograd.Function, forward+backward", python_node),
            ("autograd: x * 2 as an aten op, forward+backward", aten_node),
            ("  difference: a Python node's extra cost", python_node - aten_node)]


def _block_rows(dev, host_us) -> list:
    """Host time of whole blocks: a NAT block (mlp ratio 3, DropPath on) as one autograd node and
    through its modules (``FOVEAL_NA_BLOCK=0``), and timm's shifted Swin block (mlp ratio 4). On the
    CPU only the Triton launches are stubbed: the blocks' matmuls run, so the figures there are
    mostly compute, not host time."""
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock
    from foveal.nat import NATBlock

    torch.manual_seed(0)
    C, heads, S = 256, 8, 14
    nat = NATBlock(C, heads, 7, 1, mlp_ratio=3., drop_path=0.1).to(dev).train()
    swin = SwinTransformerBlock(C, (S, S), heads, window_size=7, shift_size=3, drop_path=0.1).to(dev).train()
    x = torch.randn(2, S, S, C, device=dev, requires_grad=True)
    g = torch.randn(2, S, S, C, device=dev)
    amp = (lambda: torch.autocast(dev.type, torch.bfloat16))

    def fwd(m):
        def f():
            with torch.no_grad(), amp():
                m(x)
        return f

    def fb(m):
        def f():
            with amp():
                y = m(x)
            y.backward(g)
        return f

    rows = []
    old = os.environ.get("FOVEAL_NA_BLOCK")
    try:
        for flag, label in (("1", "NAT block, one node"), ("0", "NAT block, modules (FOVEAL_NA_BLOCK=0)")):
            os.environ["FOVEAL_NA_BLOCK"] = flag
            rows += [(f"{label}, forward, no grad", host_us(fwd(nat))),
                     (f"{label}, forward+backward", host_us(fb(nat)))]
    finally:
        if old is None:
            os.environ.pop("FOVEAL_NA_BLOCK", None)
        else:
            os.environ["FOVEAL_NA_BLOCK"] = old
    rows += [("Swin block (timm), forward, no grad", host_us(fwd(swin))),
             ("Swin block (timm), forward+backward", host_us(fb(swin)))]
    return rows


def _forced_custom_op(nbh, fn):
    """``fn`` with every NA call routed through the ``foveal::na_fwd`` dispatcher (the path compiled
    graphs, export and dispatch modes take)."""
    eager_ok = nbh._eager_ok

    def forced():
        nbh._eager_ok = lambda *a: False
        try:
            fn()
        finally:
            nbh._eager_ok = eager_ok

    return forced


if __name__ == "__main__":
    sys.exit(main())

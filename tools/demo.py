"""Builds a small foveal backbone, runs neighborhood attention on the CPU and prints what it did."""
import time

import timm
import torch

import foveal
from foveal.kernels import NA_BACKENDS, na2d


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 28, 28, 4, 32) for _ in range(3))
    rpb = torch.randn(4, 13, 13)
    t0 = time.perf_counter()
    out = na2d(q, k, v, kernel_size=7, dilation=2, rpb=rpb)
    dt = time.perf_counter() - t0
    print(f"foveal {foveal.__version__}: backends {NA_BACKENDS.names()}")
    print(f"na2d q{tuple(q.shape)} kernel 7 dilation 2 with rpb -> out{tuple(out.shape)} in {dt * 1e3:.1f} ms")
    names = timm.list_models("*nat*")
    if names:
        model = timm.create_model(names[0]).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(1, *size)
        with torch.no_grad():
            logits = model(x)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{names[0]}: {params:.1f}M params, input {tuple(x.shape)} -> logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()

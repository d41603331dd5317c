#!/usr/bin/env python3
"""Bytes that autograd keeps for the backward, per image, for timm models (foveal's included).

The activations saved by a training forward are most of a model's peak training memory at real
batch sizes, and they do not depend on the device: this counts them on the CPU. Every tensor a
forward saves for its backward is recorded once per storage (views of one tensor count once);
parameters and the constant per-step part (autocast's weight copies) are excluded by taking the
difference between batch sizes 2 and 4.

    python tools/saved_activations.py --models nat_tiny swin_tiny_patch4_window7_224
    python tools/saved_activations.py --models nat_tiny --timm-mlp     # NAT blocks with timm's Mlp
"""
import argparse
import sys

import torch
import timm

import foveal  # noqa: F401  (registers foveal's models)
from foveal.layers import RecomputeMlp


def _with_timm_mlp(model: torch.nn.Module) -> None:
    """Swaps every RecomputeMlp for a timm Mlp with the same weights (the unfused reference)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RecomputeMlp):
                plain = timm.layers.Mlp(child.fc1.in_features, child.fc1.out_features, child.fc2.out_features,
                                        act_layer=type(child.act), bias=child.fc1.bias is not None)
                plain.act = child.act
                plain.load_state_dict(child.state_dict())
                setattr(module, child_name, plain)


def saved_bytes(name: str, batch: int, img_size: int, dtype: torch.dtype, timm_mlp: bool) -> int:
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    if timm_mlp:
        _with_timm_mlp(model)
    x = torch.randn(batch, 3, img_size, img_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(x)
    return sum(seen.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="autocast dtype (float32: no autocast; default: bfloat16)")
    parser.add_argument("--timm-mlp", action="store_true", help="run foveal's blocks with timm's Mlp instead")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    mlp = " (timm Mlp)" if args.timm_mlp else ""
    print(f"saved for backward per image, {args.img_size}x{args.img_size}, autocast {args.dtype}; torch {torch.__version__}")
    print("\n| model | MiB / image |\n|---|---:|")
    for name in args.models:
        small, large = (saved_bytes(name, b, args.img_size, dtype, args.timm_mlp) for b in (2, 4))
        print(f"| {name}{mlp} | {(large - small) / 2 / 2**20:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

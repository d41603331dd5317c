#!/usr/bin/env python3
"""Convert an official checkpoint into a timm model folder (``model.safetensors`` + ``config.json``).

    python tools/convert.py nat_tiny.pth --model nat_tiny.in1k --output weights/nat_tiny.in1k
    python tools/convert.py biformer_small.pth --model biformer_small --key model
    python -c "import foveal, timm; timm.create_model('local-dir:weights/nat_tiny.in1k')"

The file is opened through ``foveal._checkpoint`` (safetensors, else a weights-only torch load that also
rebuilds the argparse / yacs configs releases pickle, as data; a full unpickle only with ``--allow-pickle``). Keys are mapped to foveal's layout by the family's own
``checkpoint_filter_fn`` (the function timm calls when it loads pretrained weights), found in the
module that registers the model, so a new family is supported by writing its filter. The folder
also gets ``conversion.json``: where the weights came from (file name, size, SHA-256) and how they
were converted, for the model card and checkpoints.md.
"""
import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

import timm
from timm.models import save_for_hf

import foveal
from foveal._checkpoint import UnsafeCheckpointError, foreign_state_dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="official checkpoint (.pth, .pt, .bin, .ckpt or .safetensors)")
    p.add_argument("--model", required=True, help="timm model name, with the pretrained tag if any (nat_tiny.in1k)")
    p.add_argument("--output", default=None, help="output folder (default: output/convert/<model>)")
    p.add_argument("--key", default=None, help="entry of the checkpoint holding the weights (default: auto)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of the checkpoint")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a full unpickle when the weights-only load refuses the file (trusted files only)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--no-filter", action="store_true", help="load the keys as they are (already in foveal's layout)")
    p.add_argument("--non-strict", action="store_true", help="write the folder even if keys are missing or unexpected")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def family_filter(model: torch.nn.Module):
    """The ``checkpoint_filter_fn`` of the module that defines ``model``'s class, or None."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(args) -> Path:
    source = Path(args.checkpoint)
    output = Path(args.output or Path("output") / "convert" / args.model.replace("/", "_"))
    if output.exists() and not args.overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it")

    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()

    try:
        state_dict = foreign_state_dict(source, allow_pickle=args.allow_pickle, key=args.key, use_ema=args.ema)
    except UnsafeCheckpointError as e:
        raise SystemExit(f"error: {e}") from e
    filter_fn = None if args.no_filter else family_filter(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        report = (f"missing keys ({len(result.missing_keys)}): {result.missing_keys[:20]}\n"
                  f"unexpected keys ({len(result.unexpected_keys)}): {result.unexpected_keys[:20]}")
        if not args.non_strict:
            raise SystemExit(f"error: the checkpoint does not match {args.model}:\n{report}\n"
                             "(--non-strict writes the folder anyway)")
        print(f"warning: partial match:\n{report}", file=sys.stderr)

    with torch.no_grad():
        c, h, w = model.pretrained_cfg["input_size"]
        logits = model(torch.randn(1, args.in_chans or c, h, w))
    if not torch.isfinite(logits).all():
        raise SystemExit("error: the converted model produces non-finite outputs")

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_for_hf(model, str(tmp), safe_serialization=True)
    record = {
        "source_file": source.name,
        "source_bytes": source.stat().st_size,
        "source_sha256": sha256(source),
        "model": args.model,
        "key": args.key,
        "ema": args.ema,
        "filter": None if filter_fn is None else f"{filter_fn.__module__}.{filter_fn.__qualname__}",
        "full_unpickle_allowed": args.allow_pickle,
        "missing_keys": result.missing_keys,
        "unexpected_keys": result.unexpected_keys,
        "params": sum(p.numel() for p in model.parameters()),
        "versions": {"foveal": foveal.__version__, "timm": timm.__version__, "torch": torch.__version__},
        "command": "python tools/convert.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, output)
    print(f"{args.model}: {record['params'] / 1e6:.2f}M params from {source.name} "
          f"(sha256 {record['source_sha256'][:12]}) -> {output}")
    print(f"load with timm.create_model('local-dir:{output}') after `import foveal`")
    return output


def main(argv=None):
    return convert(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

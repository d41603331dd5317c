#!/usr/bin/env python3
"""Top-1 / top-5 accuracy of a timm model (foveal's included) on a dataset.

    python tools/validate.py --model nat_tiny.in1k --pretrained --dataset folder --data-dir /data/imagenet
    python tools/validate.py --model local-dir:output/train/<run>/model --dataset fashion-mnist
    python tools/validate.py --model nat_mini.in1k --pretrained --foolbox foolbox-3.3.4-py3-none-any.whl

Images go through the model's own preprocessing: ``timm.data.resolve_data_config`` on the model's
pretrained cfg, then ``create_transform`` (any of --img-size, --crop-pct, --mean, ... override it).
``--foolbox`` runs on the 20 labelled ImageNet validation images that ship in the foolbox package, a
quick real-image check that pretrained weights and preprocessing are right (a good ImageNet model
gets nearly all of them).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import timm
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import foveal  # noqa: F401  (registers foveal's models in timm)
from foveal._checkpoint import foreign_state_dict
from data_sources import create_image_dataset, foolbox_imagenet_samples, set_transform


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name, hf-hub:<repo> or local-dir:<folder>")
    p.add_argument("--pretrained", action="store_true",
                   help="load the model's pretrained weights (implied for local-dir: and hf-hub: names)")
    p.add_argument("--checkpoint", default=None,
                   help="weights to load: a .safetensors file, a training checkpoint folder, or a foreign file")
    p.add_argument("--allow-pickle", action="store_true", help="allow a full unpickle of --checkpoint (trusted files)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--foolbox", nargs="?", const="", default=None, metavar="SOURCE",
                   help="validate on foolbox's labelled ImageNet images (a wheel, a folder, or the installed package)")
    p.add_argument("--dataset", default="fashion-mnist", help="as in tools/train.py")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="validation")
    p.add_argument("--dataset-download", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--batch-size", "-b", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--crop-mode", default=None)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--verbose", action="store_true", help="print each image's prediction (foolbox)")
    p.add_argument("--results-file", default=None, help="also write the results as JSON here")
    return p


def load_weights(model, path: str, allow_pickle: bool) -> None:
    p = Path(path)
    if p.is_dir():  # a training checkpoint folder or an exported model folder
        p = p / "model.safetensors"
    state_dict = foreign_state_dict(p, allow_pickle=allow_pickle)
    model.load_state_dict(state_dict)


def create_model(args):
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    # a folder or hub repo is its weights: load them unless other weights are given
    pretrained = args.pretrained or (args.model.startswith(("local-dir:", "hf-hub:")) and not args.checkpoint)
    model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.allow_pickle)
    return model.eval()


def data_config_for(args, model) -> dict:
    overrides = {k: getattr(args, k) for k in ("img_size", "input_size", "crop_pct", "crop_mode",
                                                "interpolation", "mean", "std") if getattr(args, k) is not None}
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None) \
        or model.pretrained_cfg.get("input_size", (3,))[0]
    config = resolve_data_config(dict(overrides, in_chans=in_chans), model=model)
    config["input_size"] = (in_chans, *config["input_size"][1:])
    for key in ("mean", "std"):
        if len(config[key]) != in_chans:  # e.g. RGB statistics for a model built with --in-chans 1
            config[key] = tuple([sum(config[key]) / len(config[key])] * in_chans)
    return config


@torch.no_grad()
def evaluate(model, loader, device, amp: bool, channels_last: bool, num_classes: int, names=None, labels=None):
    k = min(5, num_classes)
    correct1 = correct5 = count = 0
    loss_sum = 0.0
    index = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += y.numel()
        if names is not None:
            probs = logits.softmax(dim=1)
            for row in range(y.numel()):
                pred = top[row, 0].item()
                mark = "ok " if pred == y[row].item() else "MISS"
                print(f"  {mark} {names[index]:<24} label {y[row].item():>4} {labels(y[row].item())[:28]:<28} "
                      f"pred {pred:>4} {labels(pred)[:28]:<28} p={probs[row, pred].item():.3f}")
                index += 1
    return dict(top1=100.0 * correct1 / count, top5=100.0 * correct5 / count, loss=loss_sum / count, count=count)


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    model = create_model(args).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = data_config_for(args, model)
    transform = create_transform(**data_config, is_training=False)
    in_chans = data_config["input_size"][0]

    names = labels = None
    if args.foolbox is not None:
        dataset = foolbox_imagenet_samples(args.foolbox or None)
        set_transform(dataset, transform, in_chans)
        source = "foolbox ImageNet samples"
        if model.num_classes != 1000:
            raise SystemExit(f"error: --foolbox needs an ImageNet-1k classifier; {args.model} has "
                             f"{model.num_classes} classes")
        if args.verbose:
            info = ImageNetInfo()
            names = [dataset.name(i) for i in range(len(dataset))]
            labels = info.index_to_description
    else:
        dataset = create_image_dataset(args.dataset, args.split, args.data_dir, in_chans=in_chans,
                                       download=args.dataset_download, limit=args.limit)
        set_transform(dataset, transform, in_chans)
        source = f"{args.dataset} {args.split}"
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {source}: "
          f"{len(dataset)} images | transform: input {tuple(data_config['input_size'])}, "
          f"crop_pct {data_config['crop_pct']}, {data_config['interpolation']}, mean {tuple(data_config['mean'])}, "
          f"std {tuple(data_config['std'])}", flush=True)
    result = evaluate(model, loader, device, args.amp, args.channels_last, model.num_classes, names, labels)
    seconds = time.perf_counter() - start
    print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
          f"({result['count']} images, {seconds:.1f} s)")
    if args.results_file:
        record = dict(model=args.model, source=source, data_config={k: (list(v) if isinstance(v, tuple) else v)
                                                                    for k, v in data_config.items()}, **result)
        Path(args.results_file).write_text(json.dumps(record, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

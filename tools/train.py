#!/usr/bin/env python3
"""Train or finetune a timm image classifier, foveal's backbones included.

With no arguments this trains ``nat_nano`` on Fashion-MNIST (60k training, 10k test images) and
prints the final test accuracy and the wall time. Everything else is an option or a YAML recipe:

    python tools/train.py                                   # Fashion-MNIST, nat_nano
    python tools/train.py --config configs/classification/nat_tiny_in1k.yaml --data-dir /data/imagenet
    python tools/train.py --model nat_tiny --pretrained --num-classes 37 --dataset /data/pets \\
        --epochs 30 --lr 1e-4 --layer-decay 0.8
    torchrun --nproc-per-node 8 tools/train.py --config ...   # DDP: nccl on GPUs, gloo on CPU
    python tools/train.py --resume output/train/<run>         # continue a run where it stopped

Built on timm's library (datasets, transforms, Mixup/CutMix, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3``); checkpoints are directories holding ``model.safetensors``
(and ``model_ema.safetensors``) plus ``training_state.pt`` (optimizer, scheduler, scaler, counters
and every rank's RNG state), each written to a temporary name and renamed into place, so a run
killed at any moment resumes from its last complete checkpoint and continues bit for bit.
"""
import time

_START = time.perf_counter()  # the reported wall time includes imports and data loading

import argparse
import contextlib
import csv
import datetime
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import timm
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn, init_distributed_device, unwrap_model

import foveal  # noqa: F401  (registers foveal's models in timm)
from data_sources import create_image_dataset, dataset_num_classes, dataset_profile, set_transform

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_EMA_WEIGHTS = "model_ema.safetensors"
CHECKPOINT_STATE = "training_state.pt"
LAST_POINTER = "last"


# -- arguments ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " With no arguments: nat_nano on Fashion-MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML recipe; keys are argument names, the command line wins")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist, 'folder' (ImageFolder tree at --data-dir), a folder path, "
                        "or a timm spec such as torch/cifar10 or hfds/<repo>")
    g.add_argument("--data-dir", default=None, help="dataset root (also the download target)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation", help="evaluation split (Fashion-MNIST: its test set)")
    g.add_argument("--dataset-download", action="store_true", help="allow downloading the dataset")
    g.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    g.add_argument("--val-limit", type=int, default=None, help="use only the first N evaluation images")
    g.add_argument("--workers", type=int, default=None, help="loader workers per process (default: 1 on CPU, 8 on GPU)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process on CPU (default: half the cores, shared by the "
                        "processes; the loader workers get the rest)")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation")
    g.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and always after the last)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="nat_nano", help="timm model name (foveal's are registered on import)")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    g.add_argument("--pretrained-path", default=None, help="pretrained weights file (implies --pretrained)")
    g.add_argument("--initial-checkpoint", default=None, help="load these weights after building the model")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the dataset)")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: from the dataset)")
    g.add_argument("--img-size", type=int, default=None, help="square input size")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    g.add_argument("--drop", type=float, default=None, help="classifier dropout rate")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra model arguments (values parsed as YAML)")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the model (optionally with a mode, e.g. max-autotune)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", "-b", type=int, default=128, help="per process")
    g.add_argument("--val-batch-size", type=int, default=None, help="default: 2 x --batch-size")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: --lr-base x global batch / --lr-base-size)")
    g.add_argument("--lr-base", type=float, default=3e-3)
    g.add_argument("--lr-base-size", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (uses group_matcher)")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--sched", default="cosine")
    g.add_argument("--warmup-epochs", type=float, default=0.5)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--sched-on-epochs", action="store_true", help="step the schedule per epoch, not per update")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy (as in ResNet Strikes Back)")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="binarize BCE targets above this")

    g = p.add_argument_group("augmentation")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--aug-repeats", type=int, default=0, help="repeated augmentation: copies of each image per epoch")
    g.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=None)
    g.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup/cutmix off from this epoch")
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--interpolation", default=None, help="evaluation resize interpolation")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)

    g = p.add_argument_group("EMA, precision, devices")
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true")
    g.add_argument("--amp", action="store_true", help="autocast (see --amp-dtype)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--output", default="output/train", help="parent folder of the run folders")
    g.add_argument("--experiment", default=None, help="run folder name (default: date-time-model)")
    g.add_argument("--resume", default=None,
                   help="run folder or checkpoint folder to continue; the run's saved arguments become defaults")
    g.add_argument("--checkpoint-interval", type=int, default=0,
                   help="also checkpoint every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept per run")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar")
    g.add_argument("--log-interval", type=int, default=10, help="progress-bar refresh interval in steps")
    return p


_NOT_SAVED = ("config", "resume")


def _normalize_config(cfg: dict, parser: argparse.ArgumentParser, origin: str) -> dict:
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in (cfg or {}).items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise ValueError(f"{origin}: unknown key {key!r} (keys are the argument names of tools/train.py)")
        out[dest] = tuple(value) if isinstance(value, list) and dest in ("scale", "ratio") else value
    return out


def load_config(path, parser: argparse.ArgumentParser, _seen=()) -> dict:
    """A YAML recipe as argument defaults; ``_base_`` (a path or a list, relative to the file) names
    recipes it inherits from, which it overrides key by key."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: _base_ recipes form a cycle")
    cfg = yaml.safe_load(path.read_text()) or {}
    bases = cfg.pop("_base_", [])
    merged = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(load_config(path.parent / base, parser, (*_seen, path)))
    merged.update(_normalize_config(cfg, parser, str(path)))
    return merged


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    defaults = {}
    if known.resume:
        run_args = find_run_dir(Path(known.resume)) / "args.yaml"
        if run_args.is_file():
            saved = yaml.safe_load(run_args.read_text())
            defaults.update(_normalize_config({k: v for k, v in saved.items() if k not in _NOT_SAVED},
                                              parser, str(run_args)))
    if known.config:
        defaults.update(load_config(known.config, parser))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# -- distributed helpers --------------------------------------------------------------------------

class Runtime:
    """Rank, world size and device of this process, with printing on the primary rank only."""

    def __init__(self, args):
        self.device = init_distributed_device(args)
        self.distributed = args.distributed
        self.rank = args.rank
        self.world_size = args.world_size
        self.primary = self.rank == 0

    def print(self, *a, **kw):
        if self.primary:
            print(*a, **kw, flush=True)

    def all_reduce_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


# -- RNG state (saved per rank so a resumed run draws the same numbers) ---------------------------

def get_rng_state(device) -> dict:
    """Every generator this process draws from, as plain Python values (they cross process
    boundaries through all_gather_object and load with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def set_rng_state(state: dict, device) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]), device)


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- checkpoints ----------------------------------------------------------------------------------

def find_run_dir(path: Path) -> Path:
    """The run folder of ``path``, which is either a run folder or one of its checkpoints."""
    if (path / CHECKPOINT_STATE).is_file():
        return path.parent.parent
    return path


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder ``path`` names: itself, or the run's latest complete checkpoint."""
    if (path / CHECKPOINT_STATE).is_file():
        return path
    pointer = path / LAST_POINTER
    if pointer.is_file():
        return path / pointer.read_text().strip()
    raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with a checkpoint")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_state_dict(model) -> dict:
    # safetensors stores each tensor once, contiguous: copy channels-last and tied weights apart
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


def _load_weights(model, path: Path) -> None:
    model.load_state_dict(safetensors.torch.load_file(str(path), device=str(next(model.parameters()).device)))


class Checkpointer:
    """Writes checkpoint folders under ``<run>/checkpoints`` and the ``last`` pointer.

    A checkpoint is built in a temporary folder and renamed into place, then ``last`` is replaced;
    a reader following ``last`` therefore always finds a complete checkpoint.
    """

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)

    def save(self, model, ema, training_state: dict, name: str, metadata: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        final = self.dir / name
        if final.exists():
            return final
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        meta = {k: str(v) for k, v in metadata.items()}
        safetensors.torch.save_file(_plain_state_dict(model), str(tmp / CHECKPOINT_WEIGHTS), metadata=meta)
        if ema is not None:
            safetensors.torch.save_file(_plain_state_dict(ema.module), str(tmp / CHECKPOINT_EMA_WEIGHTS),
                                        metadata=meta)
        torch.save(training_state, tmp / CHECKPOINT_STATE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        _atomic_write_text(self.run_dir / LAST_POINTER, str(final.relative_to(self.run_dir)) + "\n")
        self._prune(keep_name=name)
        return final

    def _remove_stale_temporaries(self) -> None:
        # left behind by a writer that was killed mid-checkpoint; never read
        for tmp in self.dir.glob(".*.tmp-*"):
            if not tmp.name.endswith(f".tmp-{os.getpid()}"):
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in done[:-self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


# -- building blocks ------------------------------------------------------------------------------

def _model_kwargs(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-kwargs takes KEY=VALUE items, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def create_model(args, num_classes: int, in_chans: int):
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **_model_kwargs(args.model_kwargs))
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    elif args.input_size is not None:
        kwargs["img_size"] = tuple(args.input_size[1:])
    pretrained = args.pretrained or args.pretrained_path is not None
    if args.pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path)
    try:
        model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise SystemExit(f"error: unknown model {args.model!r}; timm.list_models() lists the choices") from e
    except TypeError:
        if "img_size" not in kwargs:
            raise
        # models without an img_size argument (most CNNs) take any input size
        kwargs.pop("img_size")
        model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    if args.initial_checkpoint:
        timm.models.load_checkpoint(model, args.initial_checkpoint)
    return model


def data_config_for(args, model, profile, in_chans: int) -> dict:
    """The model's preprocessing (timm's resolve_data_config), with the dataset's defaults and the
    command line on top; the channel count is the one the model was built with."""
    overrides = {}
    if profile is not None:
        overrides.update(input_size=profile.input_size, mean=profile.mean, std=profile.std,
                         crop_pct=profile.crop_pct, interpolation=profile.interpolation)
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if getattr(args, key) is not None:
            overrides[key] = tuple(getattr(args, key)) if key in ("mean", "std") else getattr(args, key)
    if args.input_size is not None:
        overrides["input_size"] = tuple(args.input_size)
    elif args.img_size is not None:
        overrides["input_size"] = (in_chans, args.img_size, args.img_size)
    if "input_size" in overrides:
        overrides["input_size"] = (in_chans, *overrides["input_size"][1:])
    config = resolve_data_config(dict(overrides, in_chans=in_chans), model=model)
    config["input_size"] = (in_chans, *config["input_size"][1:])
    for key in ("mean", "std"):
        if len(config[key]) != in_chans:  # e.g. an RGB model's statistics on a 1-channel dataset
            config[key] = tuple([sum(config[key]) / len(config[key])] * in_chans)
    return config


def build_transforms(args, data_config):
    train = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        no_aug=args.no_aug,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter or 0.0,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    evaluation = create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
    )
    return train, evaluation


class EpochLoader:
    """Training batches whose order and augmentation depend only on (seed, epoch, rank)."""

    def __init__(self, dataset, batch_size, workers, runtime, seed, pin_memory, aug_repeats=0):
        self.dataset = dataset
        self.runtime = runtime
        self.seed = seed
        self.generator = torch.Generator()
        if aug_repeats > 1:
            self.sampler = RepeatAugSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                                            num_repeats=aug_repeats)
        elif runtime.distributed:
            self.sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed,
                drop_last=True)
        else:
            self.sampler = torch.utils.data.RandomSampler(dataset, generator=self.generator)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=pin_memory, drop_last=True, generator=self.generator,
            persistent_workers=False)

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch: int):
        self.generator.manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.runtime.rank)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return iter(self.loader)


def eval_loader(dataset, batch_size, workers, runtime, pin_memory):
    # every sample once: ranks take interleaved shards without padding, results are summed
    if runtime.distributed:
        dataset = torch.utils.data.Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0))


# -- train / evaluate -----------------------------------------------------------------------------

class Trainer:
    def __init__(self, args, runtime, model, train_loader, eval_loader_, mixup, checkpointer, num_classes):
        self.args = args
        self.rt = runtime
        self.device = runtime.device
        self.model = model
        self.train_loader = train_loader
        self.eval_loader = eval_loader_
        self.mixup = mixup
        self.checkpointer = checkpointer
        self.num_classes = num_classes
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.history = []
        self._pending_rng = None  # this rank's RNG state from a checkpoint, set once fast-forwarded

        self.optimizer = create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay,
            **({"eps": args.opt_eps} if args.opt_eps is not None else {}),
            **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}),
        )
        # the schedule may outlast --epochs (cooldown epochs at min_lr): its length is the run's length
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=args.sched_on_epochs, updates_per_epoch=len(train_loader),
        )
        self.amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
            if args.model_ema else None
        if args.bce_loss:
            self.train_criterion = BinaryCrossEntropy(
                smoothing=0.0 if mixup is not None else args.smoothing, target_threshold=args.bce_target_thresh)
        elif mixup is not None:
            self.train_criterion = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.train_criterion = torch.nn.CrossEntropyLoss()
        # what training runs (compiled and/or DDP-wrapped) and what evaluation runs (never DDP: its
        # per-forward buffer broadcast would hang on shards of unequal length); set in prepare()
        self.net = self.eval_net = model

    # -- setup --

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def load(self, ckpt_dir: Path):
        _load_weights(self.model, ckpt_dir / CHECKPOINT_WEIGHTS)
        if self.ema is not None:
            ema_file = ckpt_dir / CHECKPOINT_EMA_WEIGHTS
            if not ema_file.is_file():
                raise FileNotFoundError(f"--model-ema is on but {ema_file} does not exist")
            _load_weights(self.ema.module, ema_file)
        state = torch.load(ckpt_dir / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.history = state.get("history", [])
        rng = state["rng"]
        if len(rng) != self.rt.world_size:
            self.rt.print(f"note: checkpoint has RNG states of {len(rng)} processes, this run has "
                          f"{self.rt.world_size}; the run continues but not bit for bit")
        self._pending_rng = rng[self.rt.rank % len(rng)]
        self.rt.print(f"resumed from {ckpt_dir} (epoch {self.epoch + 1}, step {self.global_step})")

    def prepare(self):
        net = self.model
        if self.args.compile:
            net = torch.compile(net, mode=None if self.args.compile == "default" else self.args.compile)
        self.eval_net = net
        if self.rt.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.net = net

    # -- checkpoint --

    def save(self):
        rng = self.rt.gather(get_rng_state(self.device))
        if not self.rt.primary:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "history": self.history,
            "rng": rng,
            "args": {k: v for k, v in vars(self.args).items() if _plain(v)},
        }
        meta = dict(model=self.args.model, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    global_step=self.global_step)
        self.checkpointer.save(self.model, self.ema, state, f"step-{self.global_step:09d}", meta)

    # -- loops --

    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def train_epoch(self, progress: bool):
        args = self.args
        self.net.train()
        steps = len(self.train_loader)
        batches = self.train_loader.epoch(self.epoch)
        skip = self.batch_in_epoch
        for _ in range(skip):  # fast-forward a resumed epoch; the RNG state is restored afterwards
            next(batches)
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng, self.device)
            self._pending_rng = None
        if self.mixup is not None and args.mixup_off_epoch and self.epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False  # still yields smoothed one-hot targets for the same loss
        bar = tqdm(total=steps, initial=skip, disable=not progress, dynamic_ncols=True, leave=False,
                   desc=f"epoch {self.epoch + 1}/{self.num_epochs}", file=sys.stderr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_steps, n_images = 0, 0
        t0 = tw = time.perf_counter()
        images_since = 0
        stopped = False
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                loss = self.train_criterion(self.net(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if args.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if args.clip_grad is not None:
                    dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
                self.optimizer.step()
            self.global_step += 1
            self.batch_in_epoch += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            if not args.sched_on_epochs:
                self.scheduler.step_update(num_updates=self.global_step)
            loss_sum += loss.detach().double()
            n_steps += 1
            n_images += x.shape[0] * self.rt.world_size
            images_since += x.shape[0] * self.rt.world_size
            bar.update(1)
            if progress and (n_steps % args.log_interval == 0 or self.batch_in_epoch == steps):
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr():.2e}",
                                img_s=f"{images_since / max(now - tw, 1e-9):.0f}")
                tw, images_since = now, 0
            if args.checkpoint_interval and self.global_step % args.checkpoint_interval == 0 \
                    and self.batch_in_epoch < steps:
                self.save()
            if args.max_steps is not None and self.global_step >= args.max_steps:
                stopped = True
                break
        bar.close()
        seconds = time.perf_counter() - t0
        total_loss, total_steps = self.rt.all_reduce_sum([loss_sum.item(), n_steps])
        return dict(
            train_loss=total_loss / max(total_steps, 1),
            train_img_s=n_images / max(seconds, 1e-9),
            train_seconds=seconds,
            stopped=stopped,
        )

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        model.eval()
        k = min(5, self.num_classes)
        correct1 = correct5 = loss_sum = count = 0.0
        for x, y in self.eval_loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            topk = logits.topk(k, dim=1).indices
            hits = topk.eq(y[:, None])
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            count += y.numel()
        correct1, correct5, loss_sum, count = self.rt.all_reduce_sum([correct1, correct5, loss_sum, count])
        return dict(top1=100.0 * correct1 / count, top5=100.0 * correct5 / count, loss=loss_sum / count,
                    count=int(count))


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, (list, tuple)) and all(_plain(v) for v in value))


def _fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


# -- main -----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rt = Runtime(args)
    device = rt.device
    # the same initial weights on every rank (EMA copies them before DDP broadcasts), then one
    # stream per rank; data order and augmentation are seeded per epoch in EpochLoader
    timm.utils.random_seed(args.seed, 0)

    profile = dataset_profile(args.dataset)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None) \
        or (profile.in_chans if profile else 3)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 1)
    if device.type == "cpu":
        # small models gain little from more threads and lose a lot when a thread has to wait for a
        # busy core: keep compute on half the cores and leave the rest to the data loader
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // (2 * rt.world_size)))
    pin = device.type == "cuda"

    # datasets first: the class count sizes the head
    train_set = create_image_dataset(args.dataset, args.train_split, args.data_dir, in_chans=in_chans,
                                     is_training=True, download=args.dataset_download,
                                     limit=args.train_limit, seed=args.seed)
    eval_set = None
    if not args.no_eval:
        eval_set = create_image_dataset(args.dataset, args.val_split, args.data_dir, in_chans=in_chans,
                                        download=args.dataset_download, limit=args.val_limit, seed=args.seed)
    num_classes = args.num_classes or dataset_num_classes(train_set) or (profile.num_classes if profile else None)
    if num_classes is None:
        raise SystemExit("error: the dataset does not say how many classes it has; pass --num-classes")

    model = create_model(args, num_classes=num_classes, in_chans=in_chans)
    timm.utils.random_seed(args.seed, rt.rank)
    data_config = data_config_for(args, model, profile, in_chans)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.sync_bn and rt.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    train_tf, eval_tf = build_transforms(args, data_config)
    set_transform(train_set, train_tf, in_chans)
    train_loader = EpochLoader(train_set, args.batch_size, workers, rt, args.seed, pin, args.aug_repeats)
    if len(train_loader) == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no batch of {args.batch_size} per process")
    ev_loader = None
    if eval_set is not None:
        set_transform(eval_set, eval_tf, in_chans)
        ev_loader = eval_loader(eval_set, args.val_batch_size or 2 * args.batch_size, workers, rt, pin)

    global_batch = args.batch_size * rt.world_size
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)

    # run folder: the resumed one, or a new one named on rank 0
    if args.resume:
        run_dir = find_run_dir(Path(args.resume))
    else:
        name = args.experiment or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.model}"
        run_dir = Path(rt.broadcast(str(Path(args.output) / name)))
    checkpointer = Checkpointer(run_dir, args.keep_checkpoints)
    trainer = Trainer(args, rt, model, train_loader, ev_loader, mixup, checkpointer, num_classes)
    if args.resume:
        trainer.load(find_checkpoint(Path(args.resume)))
    trainer.prepare()

    if rt.primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = {k: v for k, v in vars(args).items() if k not in _NOT_SAVED and _plain(v)}
        saved.update(scale=list(args.scale), ratio=list(args.ratio))
        for k in ("rank", "world_size", "local_rank", "distributed", "device"):
            saved.pop(k, None)
        _atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(saved, sort_keys=True))
    params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    where = f"{rt.world_size} x {device.type}" + (
        f" ({threads} thread{'s' if threads > 1 else ''} each)" if device.type == "cpu" else "")
    rt.print(f"model {args.model}: {params / 1e6:.2f}M params, input {tuple(data_config['input_size'])}, "
             f"{num_classes} classes | data {args.dataset}: {len(train_set)} train, "
             f"{len(eval_set) if eval_set is not None else 0} eval images | {where}, global batch {global_batch}, "
             f"lr {args.lr:.2e}, {trainer.num_epochs} epochs | run {run_dir}")

    progress = rt.primary and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    summary = None
    train_stats = {"stopped": False}
    if trainer.epoch >= trainer.num_epochs:
        rt.print(f"nothing to train: the run finished its {trainer.num_epochs} epochs (raise --epochs to go on)")
    while trainer.epoch < trainer.num_epochs:
        epoch = trainer.epoch
        train_stats = trainer.train_epoch(progress)
        finished_epoch = not train_stats["stopped"] or trainer.batch_in_epoch == len(train_loader)
        last = train_stats["stopped"] or epoch + 1 == trainer.num_epochs
        row = dict(epoch=epoch + 1, step=trainer.global_step, lr=trainer.lr(),
                   train_loss=train_stats["train_loss"], train_img_s=train_stats["train_img_s"],
                   epoch_seconds=train_stats["train_seconds"])
        if ev_loader is not None and (last or (epoch + 1) % args.eval_interval == 0):
            if rt.distributed and not args.sync_bn:
                distribute_bn(model, rt.world_size, reduce=True)
            ev = trainer.evaluate(trainer.eval_net)
            row.update(eval_top1=ev["top1"], eval_top5=ev["top5"], eval_loss=ev["loss"])
            if trainer.ema is not None:
                ema_ev = trainer.evaluate(trainer.ema.module)
                row.update(ema_top1=ema_ev["top1"], ema_top5=ema_ev["top5"], ema_loss=ema_ev["loss"])
        row["elapsed_seconds"] = time.perf_counter() - _START
        if finished_epoch:
            trainer.epoch += 1
            trainer.batch_in_epoch = 0
            if args.sched_on_epochs:
                trainer.scheduler.step(trainer.epoch)
        trainer.history.append(row)
        trainer.save()
        if rt.primary:
            _log_row(run_dir, row)
            rt.print(_summary_line(row, trainer.num_epochs))
        summary = row
        if train_stats["stopped"]:
            break

    if rt.primary:
        export = run_dir / "model"
        export_model = trainer.ema.module if trainer.ema is not None else model
        _export(export_model, export, data_config)
        rt.print(f"weights for timm.create_model('local-dir:{export}') written to {export}")
        seconds = sum(r["epoch_seconds"] for r in trainer.history)
        if seconds > 0:
            img_s = sum(r["train_img_s"] * r["epoch_seconds"] for r in trainer.history) / seconds
            rt.print(f"training throughput: {img_s:.0f} img/s in all, {img_s / rt.world_size:.0f} img/s per "
                     f"process ({rt.world_size} x {device.type}, {_fmt_time(seconds)} of training steps)")
        if summary and "eval_top1" in summary:
            which = "final" if not train_stats["stopped"] else f"step {trainer.global_step}"
            rt.print(f"{which} test accuracy: top-1 {summary['eval_top1']:.2f}%, top-5 {summary['eval_top5']:.2f}% "
                     f"({args.model} on {args.dataset} {_split_name(eval_set, args.val_split)}, {len(eval_set)} images)"
                     + (f"; EMA top-1 {summary['ema_top1']:.2f}%" if "ema_top1" in summary else ""))
        elapsed = time.perf_counter() - _START
        rt.print(f"wall time: {_fmt_time(elapsed)} ({elapsed:.1f} s, imports and data loading included)")
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _split_name(dataset, requested: str) -> str:
    # Fashion-MNIST has no validation split: its evaluation split is the test set, and says so
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "split", requested)


def _export(model, folder: Path, data_config):
    from timm.models import save_for_hf
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    data_cfg = {k: data_config[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}
    model = unwrap_model(model).to(memory_format=torch.contiguous_format)  # safetensors wants contiguous
    save_for_hf(model, str(tmp), safe_serialization=True, data_config=data_cfg)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


_CSV_FIELDS = ("epoch", "step", "lr", "train_loss", "train_img_s", "epoch_seconds", "eval_top1", "eval_top5",
               "eval_loss", "ema_top1", "ema_top5", "ema_loss", "elapsed_seconds")


def _log_row(run_dir: Path, row: dict):
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    csv_path = run_dir / "summary.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, restval="")
        if new:
            w.writeheader()
        w.writerow(row)


def _summary_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"step {row['step']}", f"loss {row['train_loss']:.4f}",
             f"lr {row['lr']:.2e}", f"{row['train_img_s']:.0f} img/s", f"epoch {row['epoch_seconds']:.1f}s"]
    if "eval_top1" in row:
        parts.append(f"test top-1 {row['eval_top1']:.2f}% top-5 {row['eval_top5']:.2f}%")
    if "ema_top1" in row:
        parts.append(f"EMA top-1 {row['ema_top1']:.2f}%")
    parts.append(f"elapsed {_fmt_time(row['elapsed_seconds'])}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()

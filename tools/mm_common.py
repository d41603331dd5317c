"""What tools/mm_train.py and tools/mm_test.py share: reading a config with command-line overrides."""
import argparse
import os
from pathlib import Path
from typing import List, Optional

import torch
from mmengine.config import Config, DictAction

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('config', help='config file (configs/mmdet/*.py or configs/mmseg/*.py)')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, default={},
        help="override config entries, key=value (e.g. train_dataloader.batch_size=4 "
             "model.backbone.init_cfg=None)")
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help="'pytorch' under torchrun (multi-GPU); 'none' for one process")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK itself
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace) -> Config:
    """The config with ``--cfg-options`` merged, launcher and work dir set."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = str(Path('work_dirs') / Path(args.config).stem)
    return cfg


def amp_available() -> bool:
    return torch.cuda.is_available()


def build_runner(cfg: Config):
    """mmengine's Runner, or the one the config names in ``runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def checkpoint_globals() -> List[object]:
    """What mmengine checkpoints hold beyond tensors, allowed for weights-only loads (resume, test)."""
    from foveal.mm import checkpoint_globals
    return checkpoint_globals()


def set_amp(cfg: Config, amp: Optional[bool]) -> None:
    """``amp=True`` forces mixed precision; by default a config's AMP falls back to fp32 off CUDA."""
    wrapper = cfg.optim_wrapper
    if amp:
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
    elif wrapper.get('type') == 'AmpOptimWrapper' and (amp is False or not amp_available()):
        print(f"AmpOptimWrapper needs a GPU{'' if amp is False else ' and none is visible'}: "
              "training in fp32 (OptimWrapper)")
        wrapper.type = 'OptimWrapper'
        wrapper.pop('loss_scale', None)

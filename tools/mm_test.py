"""Evaluate an mmdet 3.x / mmseg 1.x checkpoint on a config's test set, with mmengine's Runner.

    python tools/mm_test.py CONFIG CHECKPOINT
    torchrun --nproc_per_node=8 tools/mm_test.py CONFIG CHECKPOINT --launcher pytorch
"""
import argparse

import torch

from mm_common import add_common_args, build_runner, checkpoint_globals, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file written by tools/mm_train.py (or any mm checkpoint)')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    runner = build_runner(cfg)
    with torch.serialization.safe_globals(checkpoint_globals()):
        metrics = runner.test()
    print(metrics)
    return metrics


if __name__ == '__main__':
    main()

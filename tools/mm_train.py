"""Train an mmdet 3.x / mmseg 1.x model from a config, with mmengine's Runner.

    python tools/mm_train.py configs/mmdet/mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py
    torchrun --nproc_per_node=8 tools/mm_train.py CONFIG --launcher pytorch     # multi-GPU
    python tools/mm_train.py CONFIG --resume                  # from the latest checkpoint of the work dir
    python tools/mm_train.py CONFIG --cfg-options train_dataloader.batch_size=4

Configs that train with AMP fall back to fp32 where no GPU is visible (``--amp`` / ``--no-amp``
decide explicitly). Checkpoints are read weights-only, with the numpy scalars mmengine writes into
them allowed.
"""
import argparse

import torch

from mm_common import add_common_args, build_runner, checkpoint_globals, load_config, set_amp


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser)
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='mixed precision on / off (default: as the config says, fp32 without a GPU)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from this checkpoint, or (no value) from the latest in the work dir')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args)
    set_amp(cfg, args.amp)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    runner = build_runner(cfg)
    with torch.serialization.safe_globals(checkpoint_globals()):
        runner.train()


if __name__ == '__main__':
    main()

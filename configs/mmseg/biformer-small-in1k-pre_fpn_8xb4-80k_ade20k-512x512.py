# Semantic FPN with a BiFormer-S backbone, ADE20K 80k iterations, 512x512 crops, AdamW lr 2e-4 wd 1e-4 on
# every parameter, linear warm-up (1000 iterations from 0.1x) within a cosine decay, AMP (loss scale
# 512), 32 images per batch: BiFormer (arXiv:2303.08810): 48.9 mIoU. The authors' recipe
# (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py, UniFormer's, on
# 8 GPUs: twice the lr and half the iterations of its 4-GPU original) over mmseg's own FPN model,
# ADE20K data and 80k schedule. The authors test with an AlignResize (sides rounded to multiples of
# 32), which mmseg 1.x does not have; this config keeps mmseg's keep-ratio resize, the backbone pads.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
out_channels = [64, 128, 256, 512]
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # the base's ResNet weights; the backbone's come from its init_cfg
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='biformer_small',
        n_win=8,  # 8 regions per side at 512x512 (the classification models use 7)
        auto_pad=True,  # maps of any size (whole-image inference) are zero-padded to a multiple of n_win
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_small.in1k')),
    neck=dict(in_channels=out_channels),
    decode_head=dict(num_classes=150))
sync_bn = 'torch'  # the authors turn the backbone's batch norms into SyncBN

max_iters = 80000
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-8, by_epoch=False, begin=0, end=max_iters),
]
train_dataloader = dict(batch_size=4)

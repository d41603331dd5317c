# RetinaNet with a BiFormer-S backbone, COCO 1x (12 epochs, single-scale 1333x800, flip), AdamW lr 1e-4
# wd 1e-4 on every parameter, AMP (loss scale 512), 16 images per batch: BiFormer (arXiv:2303.08810):
# 45.9 box AP. Model, data and schedule come from mmdet's R-50 RetinaNet 1x config, the base of the
# authors' one (rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_small.py).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

# the FPN starts at stride 8: the stride-4 output (and its norm) is not returned, which is the authors'
# FPN(start_level=1) over all four outputs without the unused parameters
out_channels = [128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='biformer_small',
        out_indices=(1, 2, 3),
        n_win=16,  # 16 regions per side at COCO sizes (the classification models use 7)
        auto_pad=True,  # maps of any size are zero-padded to a multiple of n_win
        drop_path_rate=0.2,
        norm_eval=True,  # the stem / downsampler batch norms stay in eval mode, as the authors' default
        init_cfg=dict(type='Pretrained', checkpoint='biformer_small.in1k')),
    neck=dict(in_channels=out_channels, start_level=0))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))

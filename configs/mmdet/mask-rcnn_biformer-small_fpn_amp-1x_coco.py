# Mask R-CNN with a BiFormer-S backbone, COCO 1x (12 epochs, single-scale 1333x800, flip), AdamW lr 1e-4
# wd 0.05, AMP (loss scale 512), 16 images per batch: BiFormer (arXiv:2303.08810): 47.8 box / 43.2 mask AP.
# Model, data and schedule come from mmdet's R-50 Mask R-CNN 1x config, the base of the authors' one
# (rayleizhu/BiFormer object_detection/configs/coco/maskrcnn.1x.biformer_small.py).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [64, 128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='biformer_small',
        n_win=16,  # 16 regions per side at COCO sizes (the classification models use 7)
        auto_pad=True,  # maps of any size are zero-padded to a multiple of n_win
        drop_path_rate=0.2,
        norm_eval=True,  # the stem / downsampler batch norms stay in eval mode, as the authors' default
        init_cfg=dict(type='Pretrained', checkpoint='biformer_small.in1k')),
    neck=dict(in_channels=out_channels))

# no weight decay on the block LayerNorms and the output norms: the authors' 'norm' key, spelled out in
# foveal.mm.FovealBackbone's parameter names (the stem / downsampler batch norms, named by index in the
# authors' model, were decayed there and are here; each key is checked to match in tests/test_mm.py)
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

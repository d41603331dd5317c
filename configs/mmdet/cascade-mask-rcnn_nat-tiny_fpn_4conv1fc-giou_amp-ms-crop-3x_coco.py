# Cascade Mask R-CNN (4conv1fc box heads with SyncBN, GIoU loss) with a NAT-Tiny backbone, COCO 3x
# with the DETR-style multi-scale crop augmentation, AdamW lr 1e-4 wd 0.05, AMP, 16 images per batch:
# NAT (arXiv:2204.07143): 51.4 box / 44.5 mask AP. Heads, schedule, data and augmentation come from
# mmdet's ConvNeXt-T config of the same recipe.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [64, 128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='nat_tiny',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='nat_tiny.in1k')),
    neck=dict(in_channels=out_channels))

# no weight decay on the relative positional biases and the LayerNorms (parameter names of
# foveal.mm.FovealBackbone over foveal.NAT; each key is checked to match in tests/test_mm.py);
# plain AdamW, not the base's layer-wise decay
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        '.attn.rpb': no_decay,
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'patch_embed.norm.': no_decay,
        'downsample.norm.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

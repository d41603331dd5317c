# UPerNet (auxiliary FCN head, weight 0.4) with a NAT-Tiny backbone, ADE20K 160k iterations, 512x512
# crops, AdamW lr 6e-5 wd 0.01, linear warm-up then poly decay, AMP, 16 images per batch:
# NAT (arXiv:2204.07143): 47.1 / 48.4 mIoU (single / multi-scale). Heads, schedule and data come
# from mmseg's Swin-T UPerNet config of the same recipe.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [64, 128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='nat_tiny',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='nat_tiny.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

# no weight decay on the relative positional biases and the LayerNorms (parameter names of
# foveal.mm.FovealBackbone over foveal.NAT; each key is checked to match in tests/test_mm.py)
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        '.attn.rpb': no_decay,
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'patch_embed.norm.': no_decay,
        'downsample.norm.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

# UPerNet (auxiliary FCN head, weight 0.4) with a BiFormer-S backbone, ADE20K 160k iterations, 512x512
# crops, AdamW lr 6e-5 wd 0.01, linear warm-up then poly decay, AMP (loss scale 512), 16 images per
# batch: BiFormer (arXiv:2303.08810): 49.8 mIoU. Heads, schedule and data come from mmseg's Swin-T
# UPerNet config of the same recipe, which the authors' follows
# (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/upernet.biformer_small.py).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [64, 128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='biformer_small',
        n_win=8,  # 8 regions per side at 512x512 (the classification models use 7)
        auto_pad=True,  # maps of any size (whole-image inference) are zero-padded to a multiple of n_win
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_small.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))
# the authors turn the backbone's batch norms into SyncBN (mmengine converts the whole model when
# distributed; the heads' norms are SyncBN already)
sync_bn = 'torch'

# no weight decay on the block LayerNorms and the output norms: the authors' 'norm' key, spelled out in
# foveal.mm.FovealBackbone's parameter names (each key is checked to match in tests/test_mm.py)
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

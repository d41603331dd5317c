# Semantic FPN, BiFormer-B, ADE20K 80k, 512x512: BiFormer (arXiv:2303.08810): 49.9 mIoU.
_base_ = './biformer-small-in1k-pre_fpn_8xb4-80k_ade20k-512x512.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='biformer_base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_base.in1k')),
    neck=dict(in_channels=out_channels))

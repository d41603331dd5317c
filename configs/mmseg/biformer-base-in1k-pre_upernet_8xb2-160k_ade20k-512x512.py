# UPerNet, BiFormer-B, ADE20K 160k, 512x512: BiFormer (arXiv:2303.08810): 51.0 mIoU.
_base_ = './biformer-small-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='biformer_base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_base.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

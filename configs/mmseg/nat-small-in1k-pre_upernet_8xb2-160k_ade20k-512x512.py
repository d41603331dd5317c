# UPerNet, NAT-Small, ADE20K 160k, 512x512: NAT (arXiv:2204.07143): 48.0 / 49.5 mIoU (ss / ms).
_base_ = './nat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='nat_small.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

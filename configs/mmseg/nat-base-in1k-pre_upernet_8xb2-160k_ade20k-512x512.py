# UPerNet, NAT-Base, ADE20K 160k, 512x512: NAT (arXiv:2204.07143): 48.5 / 49.7 mIoU (ss / ms).
_base_ = './nat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

out_channels = [128, 256, 512, 1024]
model = dict(
    backbone=dict(
        model_name='nat_base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='nat_base.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

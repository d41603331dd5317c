# UPerNet, NAT-Mini, ADE20K 160k, 512x512: NAT (arXiv:2204.07143): 45.1 / 46.4 mIoU (ss / ms).
_base_ = './nat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='nat_mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='nat_mini.in1k')))

# UPerNet, DiNAT-Mini, ADE20K 160k, 512x512: DiNAT (arXiv:2209.15001): 45.8 / 47.2 mIoU (ss / ms).
_base_ = './dinat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='dinat_mini',
        drop_path_rate=0.2,
        dilations=[[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]],
        init_cfg=dict(type='Pretrained', checkpoint='dinat_mini.in1k')))

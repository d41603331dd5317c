# RetinaNet, BiFormer-B, COCO 1x: BiFormer (arXiv:2303.08810): 47.1 box AP.
_base_ = './retinanet_biformer-small_fpn_amp-1x_coco.py'

out_channels = [192, 384, 768]
model = dict(
    backbone=dict(
        model_name='biformer_base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_base.in1k')),
    neck=dict(in_channels=out_channels))

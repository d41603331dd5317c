# Mask R-CNN, NAT-Small, COCO 3x: NAT (arXiv:2204.07143): 48.4 box / 43.2 mask AP.
_base_ = './mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='nat_small.in1k')),
    neck=dict(in_channels=out_channels))

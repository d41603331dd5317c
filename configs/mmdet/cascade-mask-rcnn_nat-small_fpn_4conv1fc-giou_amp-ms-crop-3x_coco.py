# Cascade Mask R-CNN, NAT-Small, COCO 3x: NAT (arXiv:2204.07143): 52.0 box / 44.9 mask AP.
_base_ = './cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='nat_small.in1k')),
    neck=dict(in_channels=out_channels))

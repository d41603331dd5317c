# Cascade Mask R-CNN, NAT-Base, COCO 3x: NAT (arXiv:2204.07143): 52.3 box / 45.1 mask AP
# (the authors' config keeps lr 1e-4 for NAT-Base).
_base_ = './cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

out_channels = [128, 256, 512, 1024]
model = dict(
    backbone=dict(
        model_name='nat_base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='nat_base.in1k')),
    neck=dict(in_channels=out_channels))

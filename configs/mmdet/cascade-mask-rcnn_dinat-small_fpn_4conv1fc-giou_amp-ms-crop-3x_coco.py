# Cascade Mask R-CNN, DiNAT-Small, COCO 3x: DiNAT (arXiv:2209.15001): 52.9 box / 45.8 mask AP.
_base_ = './cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_small.in1k')),
    neck=dict(in_channels=out_channels))

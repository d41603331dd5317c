# Mask R-CNN, DiNAT-Small, COCO 3x: DiNAT (arXiv:2209.15001): 49.3 box / 44.0 mask AP.
_base_ = './mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_small.in1k')),
    neck=dict(in_channels=out_channels))

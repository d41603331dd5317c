# Mask R-CNN, NAT-Mini, COCO 3x: NAT (arXiv:2204.07143): 46.5 box / 41.7 mask AP.
_base_ = './mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='nat_mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='nat_mini.in1k')))

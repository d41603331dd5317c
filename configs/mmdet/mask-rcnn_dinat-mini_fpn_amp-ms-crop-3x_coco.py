# Mask R-CNN, DiNAT-Mini, COCO 3x: DiNAT (arXiv:2209.15001): 47.2 box / 42.5 mask AP.
_base_ = './mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='dinat_mini',
        drop_path_rate=0.2,
        dilations=[[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]],
        init_cfg=dict(type='Pretrained', checkpoint='dinat_mini.in1k')))

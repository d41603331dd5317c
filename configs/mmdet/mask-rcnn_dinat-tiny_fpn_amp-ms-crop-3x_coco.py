# Mask R-CNN, DiNAT-Tiny, COCO 3x: DiNAT (arXiv:2209.15001): 48.6 box / 43.5 mask AP.
# The ImageNet weights are re-dilated for COCO's 800x1333 inputs (the parameters do not change).
_base_ = './mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py'

# the authors' COCO dilations; stage 3 repeats (1, 3, 1, 5, 1, 7) over its 18 (mini: 6) blocks
dilations = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]]
model = dict(
    backbone=dict(
        model_name='dinat_tiny',
        drop_path_rate=0.2,
        dilations=dilations,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_tiny.in1k')))

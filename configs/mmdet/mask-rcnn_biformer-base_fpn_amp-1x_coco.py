# Mask R-CNN, BiFormer-B, COCO 1x: BiFormer (arXiv:2303.08810): 48.6 box / 43.7 mask AP.
_base_ = './mask-rcnn_biformer-small_fpn_amp-1x_coco.py'

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        model_name='biformer_base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='biformer_base.in1k')),
    neck=dict(in_channels=out_channels))

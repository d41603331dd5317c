# Cascade Mask R-CNN, DiNAT-Base, COCO 3x, lr 7.5e-5: DiNAT (arXiv:2209.15001): 53.4 box / 46.2 mask AP.
_base_ = './cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

out_channels = [128, 256, 512, 1024]
model = dict(
    backbone=dict(
        model_name='dinat_base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_base.in1k')),
    neck=dict(in_channels=out_channels))
optim_wrapper = dict(optimizer=dict(lr=7.5e-5))

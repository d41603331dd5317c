# Cascade Mask R-CNN, DiNAT-Large, COCO 3x, lr 7.5e-5, fp32 (the authors trained DiNAT-L without
# fp16): DiNAT (arXiv:2209.15001): 55.3 box / 47.8 mask AP. The authors started from the
# ImageNet-22k checkpoint; the registered hub weights are its ImageNet-1k fine-tune (point
# init_cfg at a local copy of the 22k file to reproduce exactly).
_base_ = './cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

out_channels = [192, 384, 768, 1536]
model = dict(
    backbone=dict(
        model_name='dinat_large',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_large.in22k_ft_in1k')),
    neck=dict(in_channels=out_channels))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=7.5e-5))

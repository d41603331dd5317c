# Mask R-CNN, Agent-Swin-T, COCO 1x (12 epochs) with the same multi-scale crop augmentation: Agent
# Attention (arXiv:2312.08874): 44.6 box / 40.7 mask AP.
_base_ = './mask-rcnn_agent-swin-tiny_fpn_ms-crop-3x_coco.py'

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

# Cascade Mask R-CNN, Agent-Swin-B, COCO 3x: Agent Attention (arXiv:2312.08874): 52.6 box / 45.3 mask AP.
_base_ = './cascade-mask-rcnn_agent-swin-small_fpn_4conv1fc-giou_ms-crop-3x_coco.py'

out_channels = [128, 256, 512, 1024]
model = dict(
    backbone=dict(
        model_name='agent_swin_base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='agent_swin_base.in1k')),
    neck=dict(in_channels=out_channels))

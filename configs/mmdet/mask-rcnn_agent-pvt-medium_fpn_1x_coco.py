# Mask R-CNN, Agent-PVT-M, COCO 1x: Agent Attention (arXiv:2312.08874): 45.9 box / 42.0 mask AP.
_base_ = './mask-rcnn_agent-pvt-tiny_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        model_name='agent_pvt_medium',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_medium.in1k')))

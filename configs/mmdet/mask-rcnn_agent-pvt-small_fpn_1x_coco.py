# Mask R-CNN, Agent-PVT-S, COCO 1x: Agent Attention (arXiv:2312.08874): 44.5 box / 41.2 mask AP.
_base_ = './mask-rcnn_agent-pvt-tiny_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        model_name='agent_pvt_small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_small.in1k')))

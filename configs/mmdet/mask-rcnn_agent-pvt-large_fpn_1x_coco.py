# Mask R-CNN, Agent-PVT-L, COCO 1x: Agent Attention (arXiv:2312.08874): 46.9 box / 42.8 mask AP.
_base_ = './mask-rcnn_agent-pvt-tiny_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        model_name='agent_pvt_large',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_large.in1k')))

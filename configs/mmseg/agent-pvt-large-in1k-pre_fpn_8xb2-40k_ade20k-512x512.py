# Semantic FPN, Agent-PVT-L, ADE20K 40k, 512x512: Agent Attention (arXiv:2312.08874): 46.52 mIoU.
_base_ = './agent-pvt-tiny-in1k-pre_fpn_8xb2-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='agent_pvt_large',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_large.in1k')))

# UPerNet, Agent-Swin-S, ADE20K 160k, 512x512: Agent Attention (arXiv:2312.08874): 48.08 mIoU.
_base_ = './agent-swin-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='agent_swin_small',
        dense_agent_num=(81, 144, 49, 49),  # the authors' S config pools 7x7 agents in stage 3 (T / B: 14x14)
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='agent_swin_small.in1k')))

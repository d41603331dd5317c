# UPerNet, Agent-Swin-B, ADE20K 160k, 512x512: Agent Attention (arXiv:2312.08874): 48.73 mIoU.
_base_ = './agent-swin-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

out_channels = [128, 256, 512, 1024]
model = dict(
    backbone=dict(
        model_name='agent_swin_base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='agent_swin_base.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

# UPerNet (auxiliary FCN head, weight 0.4) with an Agent-Swin-T backbone, ADE20K 160k iterations, 512x512
# crops, AdamW lr 6e-5 wd 0.01, linear warm-up then poly decay, 16 images per batch: Agent Attention
# (arXiv:2312.08874): 46.68 mIoU. Heads, schedule and data come from mmseg's Swin-T UPerNet config of the
# same recipe, which the authors' follows (LeapLabTHU/Agent-Attention downstream/segmentation/configs/
# agent_swin/upernet_agent_swin_t_9-12-14-7.py; trained in fp32, as here).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='agent_swin_tiny',
        # agents pooled per stage (9x9, 12x12, 14x14, 7x7; the classification models pool 9, 16, 49,
        # 49, the grid the bias tables keep)
        dense_agent_num=(81, 144, 196, 49),
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='agent_swin_tiny.in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))

# no weight decay on the agent bias tables, the B blocks' relative position tables and the LayerNorms
# (the authors' keys, spelled out in foveal.mm.FovealBackbone's parameter names; each key is checked to
# match in tests/test_mm.py)
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        **{f'.attn.{table}': no_decay for table in ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')},
        '.attn.relative_position_bias_table': no_decay,
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'patch_embed.norm.': no_decay,
        'downsample.norm.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

# Cascade Mask R-CNN (4conv1fc box heads with SyncBN, GIoU loss) with an Agent-Swin-S backbone, COCO 3x
# with the DETR-style multi-scale crop augmentation, AdamW lr 1e-4 wd 0.05, 16 images per batch: Agent
# Attention (arXiv:2312.08874): 52.6 box / 45.5 mask AP. Heads, schedule, data and augmentation come from
# mmdet's ConvNeXt-T config of the same recipe, which the authors' follows
# (LeapLabTHU/Agent-Attention downstream/detection/configs/agent_swin/agent_swin_s_crcnn_3x_9-12-14-7.py;
# trained in fp32, as here).
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [96, 192, 384, 768]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='agent_swin_small',
        # agents pooled per stage at COCO sizes (9x9, 12x12, 14x14, 7x7; the classification models
        # pool 9, 16, 49, 49, the grid the bias tables keep)
        dense_agent_num=(81, 144, 196, 49),
        drop_path_rate=0.1,  # the authors' value for S (B: 0.4)
        init_cfg=dict(type='Pretrained', checkpoint='agent_swin_small.in1k')),
    neck=dict(in_channels=out_channels))

# the warm-up of the authors' mmdet 2.x schedule base (500 iterations, from 0.001x)
max_epochs = 36
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]

# no weight decay on the agent bias tables, the B blocks' relative position tables and the LayerNorms
# (the authors' keys, spelled out in foveal.mm.FovealBackbone's parameter names; each key is checked to
# match in tests/test_mm.py); plain AdamW in fp32, not the base's layer-wise decay and AMP
no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        **{f'.attn.{table}': no_decay for table in ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')},
        '.attn.relative_position_bias_table': no_decay,
        '.norm1.': no_decay,
        '.norm2.': no_decay,
        'patch_embed.norm.': no_decay,
        'downsample.norm.': no_decay,
        'backbone.norm': no_decay,  # the output norms norm0 .. norm3
    }))

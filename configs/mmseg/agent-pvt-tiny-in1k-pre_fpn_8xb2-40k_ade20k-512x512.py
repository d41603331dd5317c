# Semantic FPN with an Agent-PVT-T backbone, ADE20K 40k iterations, 512x512 crops, AdamW lr 2e-4 wd 1e-4
# on every parameter, poly decay (power 0.9), 16 images per batch: Agent Attention (arXiv:2312.08874):
# 40.18 mIoU. The authors' recipe (LeapLabTHU/Agent-Attention downstream/segmentation/configs/agent_pvt/
# fpn_agent_pvt_t_12-16-28-28.py; fp32, as here) over mmseg's own FPN model, ADE20K data and 40k schedule.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_40k.py'
]
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
out_channels = [64, 128, 320, 512]
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # the base's ResNet weights; the backbone's come from its init_cfg
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='agent_pvt_tiny',
        # agents pooled per stage (12x12, 16x16, 28x28, 28x28; the classification models pool 9, 16,
        # 49, 49, the grid the bias tables keep)
        dense_agent_num=(144, 256, 784, 784),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_tiny.in1k')),
    neck=dict(in_channels=out_channels),
    decode_head=dict(num_classes=150))

max_iters = 40000
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_dataloader = dict(batch_size=2)

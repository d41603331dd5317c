# Mask R-CNN with an Agent-PVT-T backbone, COCO 1x (12 epochs, single-scale 1333x800, flip), AdamW lr 2e-4
# wd 1e-4 on every parameter, 16 images per batch: Agent Attention (arXiv:2312.08874): 41.4 box / 38.7
# mask AP. Model, data and schedule come from mmdet's R-50 Mask R-CNN 1x config, the base of the
# authors' one (LeapLabTHU/Agent-Attention downstream/detection/configs/agent_pvt/
# agent_pvt_t_mrcnn_1x_12-16-28-28.py).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['foveal.mm'], allow_failed_imports=False)

out_channels = [64, 128, 320, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='FovealBackbone',
        model_name='agent_pvt_tiny',
        # agents pooled per stage at COCO sizes (12x12, 16x16, 28x28, 28x28; the classification
        # models pool 9, 16, 49, 49, the grid the bias tables keep)
        dense_agent_num=(144, 256, 784, 784),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='agent_pvt_tiny.in1k')),
    neck=dict(in_channels=out_channels))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))

# A short fine-tune for checking a set-up end to end (not a paper result): Mask R-CNN with a NAT-Mini
# backbone on 256x256 tiles of the aerial images with tree-crown boxes that the deepforest package
# ships (one class; the masks are the boxes), 300 iterations, evaluated every 100 with COCO box / mask AP on
# tiles of another image of the same site. Write the data first:
#   python tools/mm_data.py deepforest data/deepforest/train --tile 256 \
#       --images 2019_YELL_2_528000_4978000_image_crop2.png OSBS_029.png
#   python tools/mm_data.py deepforest data/deepforest/val --tile 256 \
#       --images 2019_YELL_2_541000_4977000_image_crop.png
#   python tools/mm_train.py configs/mmdet/mask-rcnn_nat-mini_fpn_300i_deepforest.py
_base_ = './mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py'

data_root = 'data/deepforest/'
metainfo = dict(classes=('Tree',), palette=[(0, 192, 64)])
model = dict(
    roi_head=dict(bbox_head=dict(num_classes=1), mask_head=dict(num_classes=1)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        _delete_=True,
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='train/annotations.json',
        data_prefix=dict(img='train/images/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=2),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=2,
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='val/annotations.json',
        data_prefix=dict(img='val/images/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val/annotations.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=50, end=max_iters),
]
optim_wrapper = dict(optimizer=dict(lr=2e-4))
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False)

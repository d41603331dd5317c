# UPerNet, DiNAT-Large, ADE20K 160k, 640x640 crops, fp32 (the authors trained DiNAT-L without fp16):
# DiNAT (arXiv:2209.15001): 54.0 / 54.9 mIoU (ss / ms). The authors started from the ImageNet-22k
# checkpoint; the registered hub weights are its ImageNet-1k fine-tune (point init_cfg at a local
# copy of the 22k file to reproduce exactly).
_base_ = './dinat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

crop_size = (640, 640)
out_channels = [192, 384, 768, 1536]
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        model_name='dinat_large',
        drop_path_rate=0.3,
        # the authors' dilations for 640x640 inputs
        dilations=[[1, 20, 1], [1, 5, 1, 10], [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5],
                   [1, 2, 1, 2, 1]],
        init_cfg=dict(type='Pretrained', checkpoint='dinat_large.in22k_ft_in1k')),
    decode_head=dict(in_channels=out_channels),
    auxiliary_head=dict(in_channels=out_channels[2]))
optim_wrapper = dict(type='OptimWrapper')

# the 640x640 pipelines of mmseg's ade20k_640x640 dataset config
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2560, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2560, 640), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# UPerNet, DiNAT-Tiny, ADE20K 160k, 512x512: DiNAT (arXiv:2209.15001): 47.8 / 48.8 mIoU (ss / ms).
# The ImageNet weights are re-dilated for 512x512 inputs (the parameters do not change).
_base_ = './nat-tiny-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

# the authors' ADE20K-512 dilations; stage 3 repeats (1, 2, 1, 3, 1, 4) over its 18 (mini: 6) blocks
dilations = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]]
model = dict(
    backbone=dict(
        model_name='dinat_tiny',
        drop_path_rate=0.3,
        dilations=dilations,
        init_cfg=dict(type='Pretrained', checkpoint='dinat_tiny.in1k')))

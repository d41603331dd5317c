"""Agent-Swin / Agent-PVT / Agent-DeiT: the agent attention layer and the models against the authors'
formulation (tests/agent_official.py), parameter counts (SPEC section 5), official-layout checkpoints
through the filters, other input sizes and agent counts, and the timm API."""
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import foveal  # noqa: F401  (registers the models)
from foveal import agent_deit, agent_pvt, agent_swin
from foveal.layers import AgentAttention, compose_agent_bias
from foveal.layers.agent import AGENT_TABLE_NAMES
from agent_official import OFFICIAL_VARIANTS, OfficialAgentAttention, build_official, randomize
from test_timm_suite import _results
from timm_sdist import load_timm_test_models, timm_tests_dir

ROOT = Path(__file__).resolve().parents[1]

PARAMS_M = {
    'agent_swin_tiny': 28.90, 'agent_swin_small': 49.67, 'agent_swin_base': 88.10,
    'agent_pvt_tiny': 11.57, 'agent_pvt_small': 20.64, 'agent_pvt_medium': 35.92, 'agent_pvt_large': 48.74,
    'agent_deit_tiny': 6.02, 'agent_deit_small': 22.65, 'agent_deit_base': 87.20,
}
FILTERS = {'agent_swin': agent_swin.checkpoint_filter_fn, 'agent_pvt': agent_pvt.checkpoint_filter_fn,
           'agent_deit': agent_deit.checkpoint_filter_fn,
           'test_agent_swin': agent_swin.checkpoint_filter_fn, 'test_agent_pvt': agent_pvt.checkpoint_filter_fn,
           'test_agent_deit': agent_deit.checkpoint_filter_fn}
TEST_MODELS = ('test_agent_swin', 'test_agent_pvt', 'test_agent_deit')
# a Swin-T-shaped layout at tiny width where the B blocks shift (stage 3 is 14x14 at 224)
SWIN_NARROW = dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), attn_type='AABB')


def _filter(name):
    return FILTERS[re.match(r'(test_)?agent_[a-z]+', name).group(0)]


def _layer_pair(kind, dim=16, heads=2, agent_num=4, window=6, agent_shape=None, seed=0):
    official = randomize(OfficialAgentAttention(dim, heads, agent_num, window, kind, agent_shape), seed)
    ours = AgentAttention(dim, num_heads=heads, agent_num=agent_num, window_size=(window, window),
                          fused_qkv=kind != 'pvt', cls_token=kind == 'deit', agent_shape=agent_shape)
    ours.load_state_dict(official.state_dict(), strict=True)
    return ours, official


@pytest.mark.parametrize('kind,size,agent_shape', [
    ('swin', (6, 6), None), ('pvt', (6, 6), None), ('deit', (6, 6), None),  # the classification formulation
    ('swin', (5, 9), (2, 2)), ('pvt', (8, 7), (2, 2)),  # other maps: row / column tables resized
    ('swin', (6, 6), (3, 3)), ('pvt', (7, 10), (4, 3)),  # dense tasks: more agents than the tables hold
])
def test_layer_matches_official(kind, size, agent_shape):
    """Outputs and gradients (input and every table) against the explicit, `.repeat`-ed formulation;
    the dense-task path (official `downstream_agent_shape`) also covers maps the tables were not sized to."""
    ours, official = _layer_pair(kind, agent_shape=agent_shape)
    h, w = size
    x = torch.randn(3, (kind == 'deit') + h * w, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = ours(x, (h, w)), official(x2, h, w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    grads = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        # the row / column tables are 4-D here, 5-D ([1, ...]) in the official layout
        torch.testing.assert_close(p.grad, grads[name].grad.reshape(p.shape), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('name', ['test_agent_swin', 'test_agent_pvt', 'test_agent_deit', 'test_agent_cswin'])
def test_channels_last_model(name):
    """`model.to(memory_format=torch.channels_last)` (timm's --channels-last) converts every 4-D / 5-D tensor;
    the row / column tables are kept 4-D so it works, and the outputs do not change."""
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, *model.default_cfg['input_size'][1:])
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)


def test_compose_agent_bias_broadcast_shapes_and_cls():
    torch.manual_seed(0)
    heads, n, h0 = 3, 9, 5
    tables = [torch.randn(heads, n, 7, 7), torch.randn(heads, n, 7, 7), torch.randn(1, heads, n, h0, 1),
              torch.randn(1, heads, n, 1, h0), torch.randn(1, heads, h0, 1, n), torch.randn(1, heads, 1, h0, n)]
    ak, qa = compose_agent_bias(*tables, (h0, h0))
    assert ak.shape == (heads, n, h0 * h0) and qa.shape == (heads, h0 * h0, n)
    expected = torch.nn.functional.interpolate(tables[0], size=(h0, h0), mode='bilinear') + tables[2][0] + tables[3][0]
    torch.testing.assert_close(ak, expected.flatten(2))
    ac, ca = torch.randn(1, heads, n, 1), torch.randn(1, heads, 1, n)
    ak2, qa2 = compose_agent_bias(*tables, (4, 6), agent_shape=(4, 4), ac_bias=ac, ca_bias=ca)
    assert ak2.shape == (heads, 16, 25) and qa2.shape == (heads, 25, 16)
    ak3, qa3 = compose_agent_bias(*tables, (4, 6), agent_shape=(3, 3), ac_bias=ac, ca_bias=ca)
    torch.testing.assert_close(ak3[:, :, 0], ac[0, :, :, 0])
    torch.testing.assert_close(qa3[:, 0], ca[0, :, 0])


def test_layer_scripts_set_window_and_errors():
    ours, official = _layer_pair('deit')
    x = torch.randn(2, 1 + 36, 16)
    scripted = torch.jit.script(ours)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, (6, 6)), official(x, 6, 6), rtol=1e-4, atol=1e-5)
        y = torch.randn(2, 1 + 8 * 10, 16)
        dynamic = ours(y, (8, 10))
        ours.set_window_size((8, 10))
        assert ours.ah_bias.shape == (2, 4, 8, 1) and ours.wa_bias.shape == (2, 1, 10, 4)
        torch.testing.assert_close(ours(y, (8, 10)), dynamic)
    with pytest.raises(ValueError, match='perfect square'):
        AgentAttention(16, num_heads=2, agent_num=8)
    with pytest.raises(ValueError, match='num_heads must divide'):
        AgentAttention(10, num_heads=3)
    with pytest.raises(ValueError, match='expected tokens'):
        ours(torch.randn(2, 36, 16), (6, 6))
    assert 'agent_num=4' in repr(ours)


@pytest.mark.parametrize('name', sorted(PARAMS_M))
def test_param_count(name):
    model = timm.create_model(name, device='meta')
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PARAMS_M[name]) <= 0.005 * PARAMS_M[name], f'{name}: {params:.3f}M vs {PARAMS_M[name]}M'


@pytest.mark.parametrize('name', sorted(PARAMS_M))
def test_official_layout_matches_on_meta(name):
    """The authors' full-size state dicts (keys, shapes, buffers) convert to exactly our state dict."""
    with torch.device('meta'):
        official = build_official(name)
        model = timm.create_model(name)
    official_sd = official.state_dict()
    assert any(k.endswith('relative_position_index') for k in official_sd) == name.startswith('agent_swin')
    converted = _filter(name)({'model': official_sd, 'optimizer': {}, 'epoch': 299}, model)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def _official_pair(name, seed=0, **model_kwargs):
    official = randomize(build_official(name, **model_kwargs.pop('official', {})), seed).eval()
    model = timm.create_model(name, **model_kwargs).eval()
    model.load_state_dict(_filter(name)({'model': official.state_dict()}, model), strict=True)
    return official, model


@pytest.mark.parametrize('name', TEST_MODELS)
def test_official_checkpoint_gives_official_logits(name):
    official, model = _official_pair(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-5)


def test_official_swin_shifted_windows_and_ema_wrapper():
    """Swin-T's layout at tiny width and 224 (the B blocks of stage 3 shift), from a `state_dict_ema` file."""
    official = randomize(build_official('agent_swin_small', **SWIN_NARROW)).eval()
    model = timm.create_model('agent_swin_small', **SWIN_NARROW).eval()
    model.load_state_dict(agent_swin.checkpoint_filter_fn({'state_dict_ema': official.state_dict()}, model))
    assert any(b.shift_size != (0, 0) for b in model.layers[2].blocks if hasattr(b, 'shift_size'))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-5)


def _to_official_swin(sd, official):
    out = dict(official.state_dict())  # its persistent index / mask buffers
    for k, v in sd.items():
        k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v[None] if k.endswith(AGENT_TABLE_NAMES) else v  # the 5-D release layout of the row / column tables
    return out


def test_swin_other_resolution_matches_official_fine_tune_layout():
    """A 224 model run at 288 resizes its row / column tables on the fly; set_input_size does the same
    in place, and the result is the authors' 288 architecture (window 72, tables at 72/36/18/9) on them."""
    _, model = _official_pair('agent_swin_small', **dict(SWIN_NARROW, official=SWIN_NARROW))
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        dynamic = model(x)
        model.set_input_size(img_size=(288, 288))  # B windows stay 7 (padded maps)
        torch.testing.assert_close(model(x), dynamic, rtol=1e-5, atol=1e-6)
        table = model.layers[2].blocks[1].attn.relative_position_bias_table.clone()
        model.set_input_size(window_size=9)  # the authors' 288 window: relative position tables resized
        expected = torch.nn.functional.interpolate(  # as the authors' fine-tuning loader does
            table.T.reshape(1, -1, 13, 13), size=(17, 17), mode='bicubic', align_corners=False).reshape(-1, 17 * 17).T
        torch.testing.assert_close(model.layers[2].blocks[1].attn.relative_position_bias_table, expected)
        official = build_official('agent_swin_small', img_size=288, window_size=72, **SWIN_NARROW).eval()
        official.load_state_dict(_to_official_swin(model.state_dict(), official), strict=True)
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-5)
    # the 288 fine-tune's own layout loads into a model built at 288 with the authors' window rule (9)
    model288 = timm.create_model('agent_swin_small', img_size=288, **SWIN_NARROW)
    official288 = build_official('agent_swin_small', img_size=288, window_size=72, **SWIN_NARROW)
    model288.load_state_dict(agent_swin.checkpoint_filter_fn(official288.state_dict(), model288), strict=True)
    assert model288.window_size == (9, 9)


def test_pvt_other_resolution_and_dense_agents_match_official():
    """Non-square input (80x96: maps 20x24 ... 2x3) with the authors' dense-task formulation, at the tables'
    agent count and at more pooled agents (dense_agent_num)."""
    x = torch.randn(1, 3, 80, 96)
    for dense in (None, (9, 16, 9, 4)):
        shapes = [(int(m ** 0.5),) * 2 for m in (dense or (4, 4, 4, 1))]
        official = randomize(build_official('test_agent_pvt', dense_agents=shapes)).eval()
        model = timm.create_model('test_agent_pvt', dense_agent_num=dense).eval()
        model.load_state_dict(agent_pvt.checkpoint_filter_fn(official.state_dict(), model), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-5)


def _window_shifts(stage):
    return [(getattr(b, 'window_size', None), getattr(b, 'shift_size', None)) for b in stage.blocks]


@pytest.mark.parametrize('name', TEST_MODELS + ('swin_narrow',))
def test_other_input_sizes(name):
    """288, 384 and 256x320 (4x smaller for the 64-pixel test members). set_input_size makes the model created
    at that size with the weights through checkpoint_filter_fn (the authors' fine-tuning resize: row / column
    tables linear, position embeddings and relative position tables bicubic). The dynamic forward resizes the
    row / column tables per call the same way, so it agrees wherever nothing else changes: every Agent-DeiT
    output, and the Agent-Swin stages up to the first whose B blocks regain a shift at the larger map (a
    model built at that size has it; the dynamic forward keeps the windows it was built with). Agent-PVT's
    dynamic forward resizes its position embeddings bilinearly, as the authors' forward does (compared with
    it in test_pvt_other_resolution_and_dense_agents_match_official)."""
    if name == 'swin_narrow':
        base, kwargs, sizes = 'agent_swin_tiny', SWIN_NARROW, ((288, 288), (384, 384), (256, 320))
    else:
        base, kwargs, sizes = name, {}, ((72, 72), (96, 96), (64, 80))
    model = timm.create_model(base, **kwargs).eval()
    swin = base.startswith(('agent_swin', 'test_agent_swin'))
    for size in sizes:
        x = torch.randn(1, 3, *size)
        resized = copy.deepcopy(model)
        resized.set_input_size(img_size=size)
        extra = dict(window_size=model.window_size) if swin else {}
        built = timm.create_model(base, img_size=size, **kwargs, **extra).eval()
        built.load_state_dict(_filter(base)(model.state_dict(), built), strict=True)
        ours = resized.state_dict()
        assert set(ours) == set(built.state_dict())
        for k, v in built.state_dict().items():
            torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-7, msg=k)
        with torch.no_grad():
            dynamic = model(x)
            feats = model.forward_intermediates(x, intermediates_only=True)
            out = resized(x)
            torch.testing.assert_close(out, built(x), rtol=1e-5, atol=1e-6)
            if base.startswith(('agent_deit', 'test_agent_deit')):
                torch.testing.assert_close(out, dynamic, rtol=1e-5, atol=1e-6)
            elif swin:
                same = 0
                while same < len(model.layers) and \
                        _window_shifts(model.layers[same]) == _window_shifts(resized.layers[same]):
                    same += 1
                assert same >= 2  # the A-only stages at least
                for a, b in zip(feats[:same], resized.forward_intermediates(x, intermediates_only=True)[:same]):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(dynamic).all()
        r = model.feature_info[-1]['reduction']
        assert feats[-1].shape[-2] in (size[0] // r, -(-size[0] // r)) and feats[-1].shape[-1] in (size[1] // r, -(-size[1] // r))


def test_filter_resizes_tables_of_another_size():
    """A 64-pixel checkpoint loads into a model built for 96 pixels (row / column tables and position
    embeddings resized bilinearly)."""
    for name in TEST_MODELS:
        source = timm.create_model(name)
        target = timm.create_model(name, img_size=96)
        target.load_state_dict(_filter(name)(source.state_dict(), target), strict=True)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_timm_api_features_and_train_step(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
    feats = timm.create_model(name, features_only=True)(x)
    assert all(f.shape[0] == 2 and f.dim() == 4 for f in feats)
    model.eval()
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize('name,official,params_m,window', [
    ('agent_swin_small_288', dict(img_size=288, window_size=72), 50, (9, 9)),
    ('agent_swin_base_384', dict(img_size=384, window_size=96), 88, (12, 12)),
    ('agent_pvt_medium_256', dict(img_size=256), 36.1, None),
])
def test_higher_resolution_releases(name, official, params_m, window):
    """The authors' 288 / 384 / 256 release files: their layout converts to exactly our state dict at that size."""
    base = name.rsplit('_', 1)[0]
    with torch.device('meta'):
        official_sd = build_official(base, **official).state_dict()
        model = timm.create_model(name)
    converted = _filter(name)({'model': official_sd}, model)
    ours = model.state_dict()
    assert set(converted) == set(ours) and all(converted[k].shape == ours[k].shape for k in ours)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params_m) <= 0.01 * params_m
    assert getattr(model, 'window_size', None) == window
    cfg = timm.get_pretrained_cfg(name)
    size = official['img_size']
    assert cfg.url[0].startswith('https://cloud.tsinghua.edu.cn/f/') and cfg.input_size == (3, size, size)


def test_cfgs_and_construction_contract():
    for name in PARAMS_M:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.url[0].startswith('https://cloud.tsinghua.edu.cn/f/') and cfg.interpolation == 'bicubic'
        assert cfg.crop_pct == 0.875 and cfg.crop_mode == 'squash' and cfg.input_size == (3, 224, 224)
    for name in TEST_MODELS:
        with pytest.raises(TypeError):
            timm.create_model(name, not_an_arg=1)
    with pytest.raises(ValueError, match='attn_type'):
        timm.create_model('test_agent_swin', attn_type='AAM')
    assert len(OFFICIAL_VARIANTS) == len(PARAMS_M) + len(TEST_MODELS)


@pytest.fixture(scope='module')
def timm_tests():
    return load_timm_test_models()


@pytest.mark.parametrize('name', TEST_MODELS)
def test_timm_forward_intermediates_and_prune(timm_tests, name):
    timm_tests.test_model_forward_intermediates(name, 1)
    timm_tests.test_model_forward_intermediates_features(name, 1)
    timm_tests.test_prune_intermediate_layers_contract(name)


def test_timm_default_cfgs_non_std_deit(timm_tests):
    """Agent-DeiT is a ViT (tokens out of forward_features): timm's non-standard-model cfg test, which
    timm's own filters apply to 'deit*' and 'vit_*' but not to 'agent_deit*'."""
    timm_tests.test_model_default_cfgs_non_std('test_agent_deit', 1, 'cpu')


@pytest.mark.slow
def test_torch_compile_fullgraph():
    model = timm.create_model('test_agent_pvt').eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """train/ and val/ folders of three colour classes (32x32 noise)."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('val', 2)):
        for label, cls in enumerate(('red', 'green', 'blue')):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size=(32, 32, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


@pytest.mark.slow
def test_recipes_train_a_step(image_folder, tmp_path):
    """One optimizer step of each agent_* recipe (its optimizer, schedule, loss and augmentation) with
    tools/train.py, on the CI-sized member of its family, all in one process."""
    recipes = sorted((ROOT / 'configs' / 'classification').glob('agent_*_in1k.yaml'))
    recipes = [r for r in recipes if not r.name.startswith('agent_cswin')]
    assert [r.stem for r in recipes] == sorted(f'agent_{fam}_{size}_in1k' for fam, sizes in (
        ('deit', ('tiny', 'small', 'base')), ('pvt', ('tiny', 'small', 'medium', 'large')),
        ('swin', ('tiny', 'small', 'base'))) for size in sizes)
    script = (
        "import sys, train\n"
        "for recipe, model, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):\n"
        f"    train.main(['--config', recipe, '--model', model, '--img-size', '64', '--dataset',"
        f" {str(image_folder)!r}, '--val-split', 'val', '--train-limit', '2', '--val-limit', '2', '--batch-size', '2',"
        " '--epochs', '1', '--workers', '0', '--aug-repeats', '0', '--output', out, '--experiment', 'a',"
        " '--progress', 'off'])\n"
    )
    args = []
    for r in recipes:
        args += [str(r), 'test_' + re.match(r'agent_([a-z]+)_', r.stem).group(0).rstrip('_'), str(tmp_path / r.stem)]
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT / 'tools'), env.get('PYTHONPATH')]))
    env.setdefault('OMP_NUM_THREADS', '2')
    proc = subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in recipes:
        rows = (tmp_path / r.stem / 'a' / 'log.jsonl').read_text().splitlines()
        assert '"step": 1' in rows[0]


@pytest.mark.slow
def test_timm_model_suite_test_variants(tmp_path):
    """timm's tests/test_models.py on test_agent_swin / test_agent_pvt / test_agent_deit; none skipped.
    test_agent_deit's standard-model cfg test is deselected (it is a ViT: see the non-std test above); the
    suite filters its forward_intermediates tests by family name, so those run directly above."""
    tests_dir = timm_tests_dir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1')
    env.pop('GITHUB_ACTIONS', None)
    select = '(test_agent_swin or test_agent_pvt or test_agent_deit) and not (test_model_default_cfgs and test_agent_deit)'
    junit = tmp_path / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'foveal', str(tests_dir / 'test_models.py'), '-k', select,
           '-q', '-rfEs', '-p', 'no:cacheprovider', f'--junitxml={junit}', '--rootdir', str(tests_dir.parent)]
    proc = subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    results, _ = _results(junit)
    assert all(o == 'passed' for per_func in results.values() for o in per_func.values()), tail
    for func in ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
                 'test_model_backward_fx', 'test_model_default_cfgs', 'test_model_forward_features'):
        for name in TEST_MODELS:
            if func == 'test_model_default_cfgs' and name == 'test_agent_deit':
                continue
            assert results[func].get(name) == 'passed', f'{func}[{name}] did not pass'

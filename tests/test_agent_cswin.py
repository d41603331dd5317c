"""Agent-CSwin: parameter counts (SPEC section 5), official-layout checkpoints through checkpoint_filter_fn
against the official formulation, other input sizes, the timm API, the training recipes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import foveal  # noqa: F401  (registers the models)
from foveal.agent_cswin import CSWinAgentAttention, CSWinStripeAttention, checkpoint_filter_fn
from agent_cswin_official import OFFICIAL_VARIANTS, OfficialAgentCSWin, randomize, resize_agent_tables
from test_timm_suite import _results
from timm_sdist import load_timm_test_models, timm_tests_dir

ROOT = Path(__file__).resolve().parents[1]
SPEC_PARAMS_M = {'agent_cswin_tiny': 20.5, 'agent_cswin_small': 32.8, 'agent_cswin_base': 73.3}
# the released stage layout (9 / 16 agents, stripes of 7) at a fraction of the width
NARROW = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratio=2.)
NARROW_OFFICIAL = dict(embed_dim=8, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratio=2.)


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', [*SPEC_PARAMS_M, 'agent_cswin_base_384'])
def test_param_counts_match_official_and_spec(name):
    model = timm.create_model(name, device='meta')
    with torch.device('meta'):
        official = OfficialAgentCSWin(**OFFICIAL_VARIANTS[name])
    assert _count(model) == _count(official)
    spec = SPEC_PARAMS_M.get(name, SPEC_PARAMS_M['agent_cswin_base'])
    assert abs(_count(model) / 1e6 - spec) <= 0.005 * spec, f'{name}: {_count(model) / 1e6:.3f}M vs {spec}M'


def _checkpoint(official_kwargs, seed=0, ema_seed=None):
    official = randomize(OfficialAgentCSWin(**official_kwargs), seed).eval()
    checkpoint = {'model': official.state_dict(), 'optimizer': {}, 'epoch': 300}
    if ema_seed is not None:
        ema = randomize(OfficialAgentCSWin(**official_kwargs), ema_seed).eval()
        checkpoint['state_dict_ema'] = ema.state_dict()
        return ema, checkpoint
    return official, checkpoint


def _load(model, checkpoint):
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    return model.eval()


def test_official_checkpoint_gives_official_logits():
    official, checkpoint = _checkpoint(OFFICIAL_VARIANTS['test_agent_cswin'])
    model = _load(timm.create_model('test_agent_cswin'), checkpoint)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)


def test_ema_weights_preferred_and_module_prefix():
    ema, checkpoint = _checkpoint(OFFICIAL_VARIANTS['test_agent_cswin'], seed=0, ema_seed=1)
    checkpoint['state_dict_ema'] = {f'module.{k}': v for k, v in checkpoint['state_dict_ema'].items()}
    model = _load(timm.create_model('test_agent_cswin'), checkpoint)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ema(x), rtol=1e-4, atol=1e-4)
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()  # this module's layout passes unchanged


def test_released_layout_at_224_narrow():
    """9 / 16 agents over 56x56 / 28x28 maps, two-stripe blocks at 14x14, a full-map block at 7x7."""
    official, checkpoint = _checkpoint(dict(NARROW_OFFICIAL, num_classes=10))
    model = _load(timm.create_model('agent_cswin_tiny', num_classes=10, **NARROW), checkpoint)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)
    keys = set(checkpoint['model'])
    for k in ('stage1_conv_embed.0.weight', 'stage1_conv_embed.2.bias', 'stage1.0.qkv.bias', 'stage1.0.norm1.weight',
              'stage1.0.attns.0.get_v.weight', 'stage1.0.attns.0.an_bias', 'stage1.0.attns.0.wa_bias',
              'stage2.0.attns.0.ah_bias', 'stage3.0.attns.1.get_v.bias', 'stage4.0.attns.0.get_v.weight',
              'stage1.0.proj.weight', 'stage1.0.mlp.fc1.weight', 'stage1.0.mlp.fc2.bias', 'stage1.0.norm2.bias',
              'merge1.conv.weight', 'merge3.norm.bias', 'norm.weight', 'head.bias'):
        assert k in keys, k
    assert checkpoint['model']['stage1.0.attns.0.ha_bias'].shape == (1, 2, 56, 1, 9)
    assert 'stage4.0.attns.1.get_v.weight' not in keys


def test_other_resolution_matches_official_finetune_rule():
    """A 224 checkpoint run at 448 equals the official model built at 448 with the authors' table resize."""
    _, checkpoint = _checkpoint(dict(NARROW_OFFICIAL, num_classes=10))
    official = OfficialAgentCSWin(img_size=448, **dict(NARROW_OFFICIAL, num_classes=10)).eval()
    official.load_state_dict(resize_agent_tables(checkpoint['model'], official), strict=True)
    model = _load(timm.create_model('agent_cswin_tiny', num_classes=10, **NARROW), checkpoint)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ref = official(x)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        # the tables stored at 448 (set_input_size, or the filter loading a 224 file into a 448 model)
        model.set_input_size(448)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        at_448 = _load(timm.create_model('agent_cswin_tiny', num_classes=10, img_size=448, **NARROW), checkpoint)
        torch.testing.assert_close(at_448(x), ref, rtol=1e-4, atol=1e-4)
    assert at_448.stages[0].blocks[0].attns[0].ah_bias.shape == (2, 9, 112, 1)


@pytest.mark.parametrize('size', [(288, 288), (384, 384), (256, 320)])
def test_runs_at_other_sizes(size):
    torch.manual_seed(0)
    model = timm.create_model('agent_cswin_tiny', num_classes=10, **NARROW).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
    h, w = size[0] // 4, size[1] // 4
    assert [t.shape[2:] for t in inter] == [(h, w), (h // 2, w // 2), ((h + 3) // 4, (w + 3) // 4),
                                            ((h + 7) // 8, (w + 7) // 8)]
    assert torch.isfinite(model.forward_head(final)).all()


def _stripe_oracle(attn, q, k, v):
    """Dense attention over the map with a same-stripe mask, and the stripe-local conv by masked shifts."""
    B, H, W, C = q.shape
    heads, s = attn.num_heads, attn.split_size
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    stripe = cols // s if attn.mode == 'vertical' else rows // s
    allowed = stripe[:, None] == stripe[None, :]
    qh, kh, vh = (t.reshape(B, H * W, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qh * attn.scale) @ kh.transpose(-2, -1)
    out = logits.masked_fill(~allowed, float('-inf')).softmax(-1) @ vh
    out = out.transpose(1, 2).reshape(B, H, W, C)
    lepe = attn.get_v.bias.expand(B, H, W, C).clone()
    smap = stripe.reshape(H, W)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            src_r, src_c = torch.arange(H)[:, None] + dy, torch.arange(W)[None, :] + dx
            inside = (src_r >= 0) & (src_r < H) & (src_c >= 0) & (src_c < W)
            src = v[:, src_r.clamp(0, H - 1), src_c.clamp(0, W - 1)]  # B, H, W, C
            same = inside & (smap[src_r.clamp(0, H - 1), src_c.clamp(0, W - 1)] == smap)
            lepe = lepe + src * same[..., None] * attn.get_v.weight[:, 0, dy + 1, dx + 1]
    return out + lepe


@pytest.mark.parametrize('mode,H,W,split', [('vertical', 5, 9, 4), ('horizontal', 9, 6, 4), ('vertical', 4, 3, 7),
                                            ('horizontal', 6, 4, 3)])
def test_stripes_at_map_edges_are_narrower(mode, H, W, split):
    torch.manual_seed(0)
    attn = CSWinStripeAttention(8, 2, mode, split).double()
    q, k, v = (torch.randn(2, H, W, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attn(q, k, v), _stripe_oracle(attn, q, k, v))


def test_agent_biases_non_square():
    """Tables resized over rows and columns independently; the 7x7 tables bilinearly to (H, W)."""
    torch.manual_seed(0)
    attn = CSWinAgentAttention(8, 2, agent_num=4, table_size=(6, 8)).double()
    bias_ak, bias_qa = attn.biases(3, 5)

    def resize(table, size):  # heads, n, length -> heads, n, size
        return F.interpolate(table, size=size, mode='linear')

    rows_ak = resize(attn.ah_bias[:, :, :, 0], 3)  # heads, n, 3
    cols_ak = resize(attn.aw_bias[:, :, 0, :], 5)  # heads, n, 5
    an = F.interpolate(attn.an_bias, size=(3, 5), mode='bilinear')
    torch.testing.assert_close(bias_ak, (an + rows_ak[..., None] + cols_ak[:, :, None]).flatten(2))
    rows_qa = resize(attn.ha_bias[:, :, 0].transpose(1, 2), 3).transpose(1, 2)  # heads, 3, n
    cols_qa = resize(attn.wa_bias[:, 0].transpose(1, 2), 5).transpose(1, 2)  # heads, 5, n
    na = F.interpolate(attn.na_bias, size=(3, 5), mode='bilinear').flatten(2).transpose(1, 2)
    torch.testing.assert_close(bias_qa, na + (rows_qa[:, :, None] + cols_qa[:, None]).flatten(1, 2))
    with pytest.raises(ValueError, match='square'):
        CSWinAgentAttention(8, 2, agent_num=8)
    with pytest.raises(ValueError, match='mode'):
        CSWinStripeAttention(8, 2, 'diagonal')


def test_cfgs_and_construction_contract():
    for name in (*SPEC_PARAMS_M, 'agent_cswin_base_384'):
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.url[0].startswith('https://cloud.tsinghua.edu.cn/f/') and cfg.interpolation == 'bicubic'
        assert cfg.crop_pct == 0.875 and cfg.crop_mode == 'squash'
    with pytest.raises(TypeError):
        timm.create_model('test_agent_cswin', not_an_arg=1)
    assert next(timm.create_model('agent_cswin_small', device='meta').parameters()).is_meta


def test_timm_api_train_step_and_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model('test_agent_cswin', drop_path_rate=0.1, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 2, 2, 192)  # NHWC, as timm's Swin
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)
    model.eval()
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.set_grad_checkpointing(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(x), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.stages[0].blocks[0].attns[0].an_bias.grad.abs().sum() > 0
    opt.step()
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    feats = timm.create_model('test_agent_cswin', features_only=True)(torch.randn(1, 3, 64, 80))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 20), (48, 8, 10), (96, 4, 5), (192, 2, 3)]


def test_torchscript_and_compile():
    torch.manual_seed(0)
    model = timm.create_model('test_agent_cswin').eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def timm_tests():
    return load_timm_test_models()


def test_timm_forward_intermediates_and_prune(timm_tests):
    timm_tests.test_model_forward_intermediates('test_agent_cswin', 1)
    timm_tests.test_model_forward_intermediates_features('test_agent_cswin', 1)
    timm_tests.test_prune_intermediate_layers_contract('test_agent_cswin')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """train/ and val/ folders of three colour classes of 32x32 noise."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('val', 2)):
        for label, name in enumerate(('red', 'green', 'blue')):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size=(32, 32, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT / 'tools'), env.get('PYTHONPATH')]))
    env.setdefault('OMP_NUM_THREADS', '2')
    return env


@pytest.mark.slow
def test_recipes_train_a_step(image_folder, tmp_path):
    """One optimizer step of each Agent-CSwin recipe (EMA included) on the CI-sized member of the family."""
    recipes = sorted((ROOT / 'configs' / 'classification').glob('agent_cswin_*_in1k.yaml'))
    assert [r.stem for r in recipes] == ['agent_cswin_base_in1k', 'agent_cswin_small_in1k', 'agent_cswin_tiny_in1k']
    script = (
        'import json, sys, train\n'
        'for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):\n'
        '    assert train.parse_args(["--config", recipe]).model == recipe.rsplit("/", 1)[-1][:-len("_in1k.yaml")]\n'
        "    train.main(['--config', recipe, '--model', 'test_agent_cswin', '--img-size', '64', '--dataset',"
        f" {str(image_folder)!r}, '--val-split', 'val', '--train-limit', '2', '--val-limit', '2', '--batch-size', '2',"
        " '--epochs', '1', '--cooldown-epochs', '0', '--workers', '0', '--output', out, '--experiment', 'c',"
        " '--progress', 'off'])\n"
    )
    outs = [tmp_path / r.stem for r in recipes]
    proc = subprocess.run([sys.executable, '-c', script, *[str(x) for pair in zip(recipes, outs) for x in pair]],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for out in outs:
        rows = (out / 'c' / 'log.jsonl').read_text().splitlines()
        assert '"step": 1' in rows[0], rows[0]
        assert any(p.name == 'model_ema.safetensors' for p in (out / 'c').rglob('*'))


@pytest.mark.slow
def test_timm_model_suite_test_variant(tmp_path):
    """timm's tests/test_models.py on the CI-sized member; none skipped."""
    tests_dir = timm_tests_dir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1')
    env.pop('GITHUB_ACTIONS', None)
    junit = tmp_path / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'foveal', str(tests_dir / 'test_models.py'), '-k', 'test_agent_cswin',
           '-q', '-rfEs', '-p', 'no:cacheprovider', f'--junitxml={junit}', '--rootdir', str(tests_dir.parent)]
    proc = subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f'timm test_models.py failed on test_agent_cswin:\n{tail}'
    results, _ = _results(junit)
    assert all(o == 'passed' for per_func in results.values() for o in per_func.values()), tail
    for func in ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
                 'test_model_backward_fx', 'test_model_default_cfgs', 'test_model_forward_features'):
        assert results[func].get('test_agent_cswin') == 'passed', f'{func} did not pass'

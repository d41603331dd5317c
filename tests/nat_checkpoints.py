"""Synthetic NAT / DiNAT checkpoints in the published layouts, and offline caches holding them.

`to_transformers` / `to_original` write a foveal state dict the way the authors' checkpoints are
laid out (transformers `NatForImageClassification` / `DinatForImageClassification` on the hub; the
original `.pth` files of the classification repo). Both are written from the layouts' definitions,
not by inverting `checkpoint_filter_fn`, so loading them strictly tests the converter.

`fill_hub_cache` / `fill_torch_hub_cache` lay those files out the way huggingface_hub and torch.hub
cache downloads, so `pretrained=True` works with HF_HUB_OFFLINE=1 and no network.
"""
import hashlib
import os
import re
from pathlib import Path
from typing import Dict, Optional

import timm
import torch

import foveal  # noqa: F401  (registers the models)
from foveal.nat import NAT

_HF_BLOCK_NAMES = {
    'norm1': 'layernorm_before',
    'attn.proj': 'attention.output.dense',
    'norm2': 'layernorm_after',
    'mlp.fc1': 'intermediate.dense',
    'mlp.fc2': 'output.dense',
}


def to_transformers(state_dict: Dict[str, torch.Tensor], prefix: str = 'dinat') -> Dict[str, torch.Tensor]:
    """foveal NAT state dict -> transformers layout (`nat.` or `dinat.` prefix, `classifier`)."""
    out = {}
    gammas = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.proj.'):
            out[f'{prefix}.embeddings.patch_embeddings.projection.' + k[len('patch_embed.proj.'):]] = v
        elif k.startswith('patch_embed.norm.'):
            out[f'{prefix}.embeddings.norm.' + k[len('patch_embed.norm.'):]] = v
        elif k.startswith('norm.'):
            out[f'{prefix}.layernorm.' + k[len('norm.'):]] = v
        elif k.startswith('head.fc.'):
            out['classifier.' + k[len('head.fc.'):]] = v
        elif m := re.match(r'levels\.(\d+)\.downsample\.(.*)', k):
            out[f'{prefix}.encoder.levels.{int(m.group(1)) - 1}.downsample.{m.group(2)}'] = v
        elif m := re.match(r'levels\.(\d+)\.blocks\.(\d+)\.(.*)', k):
            layer = f'{prefix}.encoder.levels.{m.group(1)}.layers.{m.group(2)}.'
            name = m.group(3)
            if name in ('gamma1', 'gamma2'):
                gammas.setdefault(layer, {})[name] = v
            elif name.startswith('attn.qkv.'):
                for part, t in zip(('query', 'key', 'value'), v.chunk(3, dim=0)):
                    out[f'{layer}attention.self.{part}.{name.rsplit(".", 1)[1]}'] = t
            elif name == 'attn.rpb':
                out[layer + 'attention.self.rpb'] = v
            else:
                module, param = name.rsplit('.', 1)
                out[f'{layer}{_HF_BLOCK_NAMES[module]}.{param}'] = v
        else:
            raise KeyError(f'no transformers name for {k}')
    for layer, g in gammas.items():
        out[layer + 'layer_scale_parameters'] = torch.stack([g['gamma1'], g['gamma2']])
    return out


def to_original(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """foveal state dict -> the authors' `.pth` layout (downsampler at the end of a stage, `head`).

    NAT / DiNAT stages are `levels`, DiNAT_s stages `layers` (Swin's naming), isotropic blocks `layers`.
    """
    swin_layout = isinstance(model, NAT) and isinstance(model.patch_embed, timm.layers.PatchEmbed)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        elif isinstance(model, NAT) and (m := re.match(r'levels\.(\d+)\.(downsample\..*)', k)):
            k = f'levels.{int(m.group(1)) - 1}.{m.group(2)}'
        if swin_layout and k.startswith('levels.'):
            k = 'layers.' + k[len('levels.'):]
        out[k] = v
    return out


def shape_only_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Zero tensors with the model's parameter shapes, all views of one storage (small files)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    buffer = torch.zeros(max(s.numel() for s in shapes.values()))
    return {k: buffer[:s.numel()].view(s) for k, s in shapes.items()}


def _write(path: Path, state_dict: Dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)


def fill_hub_cache(cache_dir: Path, hub_id: str, filename: str, state_dict: Dict[str, torch.Tensor]) -> Path:
    """Write `state_dict` where huggingface_hub caches `hub_id/filename` (refs/main + snapshots/<rev>)."""
    revision = hashlib.sha1(hub_id.encode()).hexdigest()
    repo = Path(cache_dir) / f'models--{hub_id.replace("/", "--")}'
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)
    path = repo / 'snapshots' / revision / filename
    _write(path, state_dict)
    return path


def fill_torch_hub_cache(torch_home: Path, url, state_dict: Dict[str, torch.Tensor]) -> Path:
    """Write `state_dict` where torch.hub caches downloads of `url` (a cfg's url: a string, or a
    (url, file name) pair for links without a file name)."""
    name = url[1] if isinstance(url, (list, tuple)) else os.path.basename(url)
    path = Path(torch_home) / 'hub' / 'checkpoints' / name
    _write(path, state_dict)
    return path


def fill_pretrained_caches(hf_cache: Path, torch_home: Path, names: Optional[list] = None) -> list:
    """Synthetic weights for every pretrained foveal NAT tag, in the layout its source publishes."""
    names = names if names is not None else timm.list_pretrained(['*nat*'])
    for name in names:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        model = timm.create_model(name, device='meta')
        state_dict = shape_only_state_dict(model)
        if cfg.get('hf_hub_id'):
            prefix = 'dinat' if name.startswith('dinat') else 'nat'
            fill_hub_cache(hf_cache, cfg['hf_hub_id'], cfg['hf_hub_filename'], to_transformers(state_dict, prefix))
        else:
            fill_torch_hub_cache(torch_home, cfg['url'], to_original(state_dict, model))
    return names


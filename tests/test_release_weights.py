"""Official release files through ``timm.create_model(..., pretrained=True)``.

The Agent-* and BiFormer releases are training checkpoints behind links without a file name, and
they pickle a config (yacs ``CfgNode``, ``argparse.Namespace``) beside the weights. Their cfgs name a
cache file (``foveal._checkpoint.release_cfg``) and the models open it weights-only, with the config
objects rebuilt as plain data. Here synthetic release files (the exact release layouts: each family's
filter maps them) are put in a torch.hub cache under those names, as a download would leave them.
"""
import argparse
import sys
import types

import pytest
import torch
import timm

import foveal  # noqa: F401
from foveal._checkpoint import load_foreign_checkpoint

FAMILIES = ["agent_swin_tiny", "agent_pvt_tiny", "agent_deit_tiny", "agent_cswin_tiny", "biformer_tiny"]


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in ``yacs.config.CfgNode`` importable while a file is written, gone when it is read."""
    mod, pkg = types.ModuleType("yacs.config"), types.ModuleType("yacs")

    class CfgNode(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    monkeypatch.setitem(sys.modules, "yacs", pkg)
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    return CfgNode


def _release_file(model_name, path, cfg_node, perturb=0.01):
    """Write a release-like file for ``model_name``: weights under ``model`` (in foveal's layout, which
    the family filters pass unchanged; the official key layouts go through the same filters in each
    family's own tests), a config object and training metadata."""
    model = timm.create_model(model_name)
    torch.manual_seed(0)
    sd = {k: (v + perturb * torch.randn_like(v)) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "config": cfg_node(MODEL=cfg_node(NAME=model_name, DROP_PATH=0.1)),
                "args": argparse.Namespace(lr=1e-3, epochs=300), "epoch": 299}, path)
    return sd


def test_config_objects_load_weights_only(tmp_path, fake_yacs):
    path = tmp_path / "release.pth"
    torch.save({"model": {"w": torch.ones(2)}, "config": fake_yacs(TRAIN=fake_yacs(EPOCHS=300)),
                "args": argparse.Namespace(lr=0.5)}, path)
    sys.modules.pop("yacs.config"), sys.modules.pop("yacs")  # reading must not need yacs
    ckpt = load_foreign_checkpoint(path)
    assert dict(ckpt["config"]) == {"TRAIN": {"EPOCHS": 300}}
    assert ckpt["args"].lr == 0.5 and torch.equal(ckpt["model"]["w"], torch.ones(2))


def test_other_pickled_objects_still_refused(tmp_path):
    from foveal._checkpoint import UnsafeCheckpointError
    path = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.ones(1)}, "fn": print}, path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_foreign_checkpoint(path)


@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_from_release_url(name, tmp_path, monkeypatch, fake_yacs):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
    url, file_name = cfg.url
    assert url.startswith("https://") and cfg.custom_load
    (tmp_path / "checkpoints").mkdir()
    sd = _release_file(name, tmp_path / "checkpoints" / file_name, fake_yacs)
    monkeypatch.delitem(sys.modules, "yacs.config"), monkeypatch.delitem(sys.modules, "yacs")

    model = timm.create_model(name, pretrained=True)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    # another class count drops the classifier, another in_chans adapts the stem, as timm does
    other = timm.create_model(name, pretrained=True, num_classes=10, in_chans=1)
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else cfg.classifier[0]
    assert other.state_dict()[classifier + ".weight"].shape[0] == 10
    first = cfg.first_conv if isinstance(cfg.first_conv, str) else cfg.first_conv[0]
    stem = other.state_dict()[first + ".weight"]
    torch.testing.assert_close(stem[:, 0], sd[first + ".weight"].sum(1))
    for k, v in sd.items():
        if not k.startswith((classifier + ".", first + ".")):
            assert torch.equal(other.state_dict()[k], v), k

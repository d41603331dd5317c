#!/usr/bin/env python3
"""Export a model folder for the Hugging Face hub (safetensors, timm config.json, model card) and upload it.

    python tools/push_to_hub.py weights/nat_tiny.in1k --repo-id foveal/nat_tiny.in1k \\
        --source-url https://github.com/SHI-Labs/Neighborhood-Attention-Transformer --license mit \\
        --paper arxiv:2204.07143 --dataset imagenet-1k --metric top1=83.2 --dry-run
    python -c "import foveal, timm; timm.create_model('local-dir:output/hub/nat_tiny.in1k')"

SOURCE is a folder that ``timm.create_model('local-dir:SOURCE')`` loads (what tools/convert.py
and tools/train.py write), or a weights file together with ``--model``. The folder is written by
timm's ``save_for_hf`` (``model.safetensors`` and ``config.json`` with the pretrained cfg), the
model card by timm's ``generate_readme`` (weight source, license, paper, metrics, usage); a
``conversion.json`` next to SOURCE is copied along as the record of where the weights came from.
Without ``--dry-run`` the folder is uploaded with huggingface_hub (``create_repo`` +
``upload_folder``; the token comes from ``--token``, ``HF_TOKEN`` or ``hf auth login``).
"""
import argparse
import json
import os
import shutil
from pathlib import Path

import torch

import timm
from timm.models import save_for_hf
from timm.models._hub import generate_readme

import foveal
from foveal._checkpoint import foreign_state_dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="model folder (config.json + weights) or a weights file (with --model)")
    p.add_argument("--repo-id", required=True, help="hub repository, <org>/<name>")
    p.add_argument("--model", default=None, help="timm model name (when SOURCE is a weights file)")
    p.add_argument("--num-classes", type=int, default=None, help="with --model: classifier size of the weights")
    p.add_argument("--in-chans", type=int, default=None, help="with --model: input channels of the weights")
    p.add_argument("--output", default=None, help="export folder (default: output/hub/<repo name>)")
    p.add_argument("--dry-run", action="store_true", help="write the folder only, upload nothing")
    p.add_argument("--license", default="apache-2.0", help="license of the weights (hub identifier)")
    p.add_argument("--source-url", default=None, help="where the original weights come from")
    p.add_argument("--paper", action="append", default=[], help="paper id or URL (repeatable)")
    p.add_argument("--dataset", action="append", default=[], help="training dataset (repeatable)")
    p.add_argument("--pretrain-dataset", action="append", default=[], help="pretraining dataset (repeatable)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE",
                   help="result to report, e.g. top1=83.2 (repeatable)")
    p.add_argument("--description", default=None, help="first paragraph of the model card")
    p.add_argument("--citation", action="append", default=[], help="BibTeX entry (repeatable)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--commit-message", default="Add model")
    return p


def load_model(args) -> torch.nn.Module:
    source = Path(args.source)
    if source.is_dir():
        if args.model:
            raise SystemExit("error: SOURCE is a folder with its own config.json; leave out --model")
        return timm.create_model(f"local-dir:{source}", pretrained=True).eval()
    if not args.model:
        raise SystemExit("error: SOURCE is a weights file; say which model it belongs to with --model")
    kwargs = {k: getattr(args, k) for k in ("num_classes", "in_chans") if getattr(args, k) is not None}
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    model.load_state_dict(foreign_state_dict(source))
    return model.eval()


def _metrics(items) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --metric takes NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def model_card(args, model, provenance: dict) -> dict:
    cfg = model.pretrained_cfg
    c, h, w = cfg["input_size"]
    details = {
        "Model Type": "Image classification / feature backbone",
        "Model Stats": {
            "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
            "Image size": f"{h} x {w}" + ("" if c == 3 else f", {c} channel{'s' if c > 1 else ''}"),
        },
    }
    if args.paper:
        details["Papers"] = args.paper
    if args.source_url:
        details["Original"] = args.source_url
    if args.dataset:
        details["Dataset"] = args.dataset if len(args.dataset) > 1 else args.dataset[0]
    if args.pretrain_dataset:
        details["Pretrain Dataset"] = args.pretrain_dataset
    metrics = _metrics(args.metric)
    if metrics:
        details["Metrics"] = metrics
    if provenance:
        details["Weights"] = {
            "converted from": f"{provenance['source_file']} (sha256 {provenance['source_sha256']})",
            "conversion": provenance.get("command", ""),
        }
    details["License"] = args.license
    arch = cfg.get("architecture", "")
    description = args.description or (
        f"A `{arch}` image model for timm, packaged by foveal. The architecture is registered in timm "
        "by `import foveal`, which must come before `timm.create_model`.")
    usage = (
        "```python\n"
        "import foveal  # registers foveal's architectures in timm\n"
        "import timm\n"
        "import torch\n\n"
        f"model = timm.create_model('hf-hub:{args.repo_id}', pretrained=True).eval()\n"
        "config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**config)\n"
        "# logits = model(transform(image).unsqueeze(0))\n"
        "```\n")
    card = dict(license=args.license, description=description, details=details, usage=usage,
                tags=["image-classification", "timm", "foveal"])
    if args.citation:
        card["citation"] = args.citation
    return card


def export(args) -> Path:
    repo_name = args.repo_id.split("/")[-1]
    output = Path(args.output or Path("output") / "hub" / repo_name)
    model = load_model(args)
    source = Path(args.source)
    provenance_file = (source if source.is_dir() else source.parent) / "conversion.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_for_hf(model, str(tmp), safe_serialization=True)
    card = model_card(args, model, provenance)
    (tmp / "README.md").write_text(generate_readme(card, repo_name), encoding="utf-8")
    if provenance:
        shutil.copy(provenance_file, tmp / "conversion.json")
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, output)
    return output


def upload(args, folder: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.token, library_name="foveal", library_version=foveal.__version__)
    repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), revision=args.revision,
                             commit_message=args.commit_message)
    return str(getattr(info, "commit_url", info))


def main(argv=None):
    args = build_parser().parse_args(argv)
    folder = export(args)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(f"wrote {folder} ({files}); it loads with timm.create_model('local-dir:{folder}')")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return folder
    print(f"uploaded to {args.repo_id}: {upload(args, folder)}")
    return folder


if __name__ == "__main__":
    main()

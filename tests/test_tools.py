"""The scripts in tools/: train, validate, benchmark, convert, push_to_hub (CPU, small data).

Most tests run the scripts as a user does, in a subprocess, on a generated ImageFolder of three
colour classes that a tiny timm model learns in a few steps.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import timm

import foveal  # noqa: F401  (registers test_nat)
from foveal._checkpoint import UnsafeCheckpointError, foreign_state_dict, load_foreign_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SCRIPTS = ("train", "validate", "benchmark", "convert", "push_to_hub", "bench_host", "saved_activations", "bench_norm",
           "bench_rpb", "profile_model", "bench_halo", "bench_routing")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

sys.path.insert(0, str(TOOLS))
import train as train_tool  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "2")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_tool(name, *args, cwd=None, timeout=300, check=True):
    proc = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name}.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ folders of three classes: reddish, greenish and bluish 32x32 noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for label, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size=(32, 32, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


TINY = ("--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "3e-3",
        "--warmup-epochs", "0", "--scale", "0.5", "1.0")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _last_checkpoint(run_dir):
    return run_dir / (run_dir / "last").read_text().strip()


# -- every script -------------------------------------------------------------------------------

def test_every_script_answers_help():
    procs = {name: subprocess.Popen([sys.executable, str(TOOLS / f"{name}.py"), "--help"], env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}.py --help failed:\n{err}"
        assert "usage:" in out and "--" in out, name


def test_bench_host_times_every_path_on_cpu():
    run = subprocess.run([sys.executable, str(TOOLS / "bench_host.py"), "--number", "5", "--repeat", "2"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tables = [[line for line in t.splitlines() if line.startswith("| ")] for t in run.stdout.split("\n\n")]
    tables = [t for t in tables if t]
    assert len(tables) == 2 and "stubbed" in run.stdout
    paths, parts = tables
    assert len(paths) == 5  # header + 4 paths
    assert all(float(r.split("|")[2]) > 0 and float(r.split("|")[3]) > 0 for r in paths[1:])  # NA and SDPA
    assert len(parts) == 5 and all(float(r.split("|")[2]) > 0 for r in parts[1:4])  # direct, two node kinds


def test_bench_norm_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench_norm.md"
    run = run_tool("bench_norm", "--device", "cpu", "--out", out)
    tables = out.read_text()
    assert run.stdout == tables
    rows = [line.split("|")[1:-1] for line in tables.splitlines() if line.startswith("| (2, 3, 5, 64) |")]
    errors, timings = rows[0], rows[1:]
    assert len(errors) == 7 and all(float(e) < 1e-2 for e in errors[1:])  # h, s, dx, dy, dweight, dbias
    assert [r[1].strip() for r in timings] == ["fwd", "fwd+bwd"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in timings)  # unfused and fused ms


def test_saved_activations_counts_the_recompute_mlp_saving():
    import saved_activations

    def per_image(timm_mlp):
        small, large = (saved_activations.saved_bytes("test_nat", b, 64, torch.bfloat16, timm_mlp) for b in (2, 4))
        return (large - small) / 2

    assert 0 < per_image(False) < per_image(True)


# -- train ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_tool("train", *TINY, "--dataset", image_folder, "--epochs", "3", "--output", out,
                    "--experiment", "tiny", "--progress", "off")
    return out / "tiny", proc.stdout


def test_train_runs_end_to_end(trained_run):
    run_dir, stdout = trained_run
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["eval_top1"] > 60.0, rows
    ckpt = _last_checkpoint(run_dir)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "training_state.pt"}
    assert ckpt.name == f"step-{rows[-1]['step']:09d}"
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # --keep-checkpoints default
    assert (run_dir / "summary.csv").read_text().count("\n") == 4
    assert "final test accuracy: top-1" in stdout and "wall time:" in stdout
    # the exported folder is a timm local-dir model carrying the training preprocessing
    model = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True)
    assert model.num_classes == 3
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_validate_on_image_folder_matches_training_eval(trained_run, image_folder, tmp_path):
    run_dir, _ = trained_run
    results = tmp_path / "val.json"
    proc = run_tool("validate", "--model", f"local-dir:{run_dir / 'model'}", "--dataset", image_folder,
                    "--split", "val", "--results-file", results)
    record = json.loads(results.read_text())
    assert record["count"] == 24
    assert record["top1"] == pytest.approx(_rows(run_dir)[-1]["eval_top1"])
    assert "top-1" in proc.stdout


def test_kill_and_resume_continues_bit_exactly(image_folder, tmp_path):
    # mixup, random erasing, EMA and in-process augmentation all draw random numbers: a resumed run
    # must restore every generator to reproduce the uninterrupted one
    args = [*TINY, "--dataset", image_folder, "--epochs", "3", "--output", tmp_path, "--checkpoint-interval", "2",
            "--mixup", "0.4", "--reprob", "0.5", "--model-ema", "--model-ema-decay", "0.9", "--workers", "0",
            "--progress", "off", "--no-eval"]

    def start(name):
        cmd = [sys.executable, str(TOOLS / "train.py"), *map(str, args), "--experiment", name]
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    uninterrupted, killed = start("straight"), start("killed")  # side by side: the same work
    pointer = tmp_path / "killed" / "last"
    deadline = time.time() + 240
    while not pointer.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, f"the run ended before it could be killed:\n{killed.stderr.read()[-3000:]}"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-3000:]
    killed_at = _last_checkpoint(tmp_path / "killed").name
    assert killed_at != _last_checkpoint(tmp_path / "straight").name

    proc = run_tool("train", "--resume", tmp_path / "killed")
    assert "resumed from" in proc.stdout
    straight, resumed = _last_checkpoint(tmp_path / "straight"), _last_checkpoint(tmp_path / "killed")
    assert straight.name == resumed.name
    for weights in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(straight / weights), load_file(resumed / weights)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{weights}:{k} differs after resume (killed at {killed_at})"


def test_resume_refuses_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_tool.find_checkpoint(tmp_path)


def test_torchrun_two_processes_on_gloo(image_folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TOOLS / "train.py"), *TINY, "--dataset", str(image_folder), "--epochs", "2", "--device", "cpu",
           "--output", str(tmp_path), "--experiment", "ddp", "--progress", "off"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 x cpu (1 thread each), global batch 16" in proc.stdout
    assert proc.stdout.count("final test accuracy") == 1  # printed by rank 0 only
    rows = _rows(tmp_path / "ddp")
    # 96 images / (8 per process x 2 processes) = 6 steps per epoch; evaluation sees all 24 once
    assert [r["step"] for r in rows] == [6, 12]
    assert (_last_checkpoint(tmp_path / "ddp") / "model.safetensors").is_file()


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_default_model_and_dataset_run(tmp_path):
    proc = run_tool("train", "--train-limit", "256", "--val-limit", "128", "--epochs", "1", "--batch-size", "64",
                    "--output", tmp_path, "--experiment", "fm", "--progress", "off")
    assert "model nat_nano" in proc.stdout and "input (1, 28, 28), 10 classes" in proc.stdout
    assert "fashion-mnist: 256 train, 128 eval images" in proc.stdout
    row = _rows(tmp_path / "fm")[0]
    assert row["step"] == 4 and 0.0 <= row["eval_top1"] <= 100.0


def test_config_keys_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        train_tool.parse_args(["--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 3\nbatch-size: 16\nscale: [0.5, 1.0]\n")
    args = train_tool.parse_args(["--config", str(good), "--epochs", "5"])
    assert (args.epochs, args.batch_size, tuple(args.scale)) == (5, 16, (0.5, 1.0))  # the command line wins


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "classification").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_classification_recipes_parse(recipe):
    args = train_tool.parse_args(["--config", str(recipe)])
    assert args.epochs >= 100 and args.opt in ("adamw", "lamb")
    assert args.model, recipe


# -- foreign checkpoints, convert, push_to_hub ----------------------------------------------------

def test_foreign_checkpoint_helper_is_weights_only_first(tmp_path):
    weights = {"module.w": torch.ones(2), "b": torch.zeros(1)}
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": weights, "epoch": 3}, plain)
    assert set(foreign_state_dict(plain)) == {"w", "b"}
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": weights, "model_ema": {"w": torch.full((2,), 5.0)}, "args": argparse.Namespace(lr=1)},
               pickled)
    # config objects the releases pickle (argparse / yacs) are rebuilt as data, weights-only
    assert load_foreign_checkpoint(pickled)["args"].lr == 1
    torch.save({"model": weights, "model_ema": {"w": torch.full((2,), 5.0)}, "hook": print}, pickled)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        load_foreign_checkpoint(pickled)
    assert foreign_state_dict(pickled, allow_pickle=True, use_ema=True)["w"][0] == 5.0
    with pytest.raises(KeyError, match="optimizer"):
        foreign_state_dict(plain, key="optimizer")


def _original_nat_layout(state_dict):
    """foveal's NAT keys -> the authors' .pth keys (downsampler at the end of the previous stage)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        elif k.startswith("levels.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"levels.{i}.downsample.", f"levels.{i - 1}.downsample.", 1)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """test_nat weights saved in the authors' layout with a pickled namespace and an object only a full
    unpickle rebuilds (a function reference), then converted."""
    if "test_nat" not in timm.list_models():
        pytest.skip("test_nat is not registered")
    tmp = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    model = timm.create_model("test_nat").eval()
    source = tmp / "nat_official.pth"
    torch.save({"model": _original_nat_layout(model.state_dict()), "args": argparse.Namespace(epochs=300),
                "hook": print}, source)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    refused = run_tool("convert", source, "--model", "test_nat", "--output", tmp / "out", check=False)
    assert refused.returncode != 0 and "--allow-pickle" in refused.stderr
    assert not (tmp / "out").exists()
    run_tool("convert", source, "--model", "test_nat", "--output", tmp / "out", "--allow-pickle")
    return tmp / "out", x, expected


def test_convert_round_trips_through_local_dir(converted):
    folder, x, expected = converted
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "conversion.json"}
    record = json.loads((folder / "conversion.json").read_text())
    assert record["filter"] == "foveal.nat.checkpoint_filter_fn" and record["full_unpickle_allowed"]
    assert record["missing_keys"] == [] and record["unexpected_keys"] == []
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_push_to_hub_dry_run_writes_a_loadable_folder(converted, tmp_path):
    folder, x, expected = converted
    out = tmp_path / "hub"
    proc = run_tool("push_to_hub", folder, "--repo-id", "foveal/test_nat.demo", "--dry-run", "--output", out,
                    "--license", "mit", "--metric", "top1=12.5", "--source-url", "https://example.org/nat.pth",
                    "--dataset", "imagenet-1k")
    assert "nothing uploaded" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "conversion.json", "README.md"}
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "top1: 12.5" in card and "https://example.org/nat.pth" in card
    assert "hf-hub:foveal/test_nat.demo" in card and "sha256" in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# -- benchmark ------------------------------------------------------------------------------------

def test_benchmark_writes_its_section_only(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkernel notes\n\n<!-- benchmark.py:begin other -->\nkept\n"
                   "<!-- benchmark.py:end other -->\n")
    args = ["--models", "test_resnet", "--img-size", "32", "--batch-size", "4", "--warmup", "1", "--iters", "2",
            "--device", "cpu", "--out", out, "--section", "cpu-test", "--no-plot"]
    isolated = run_tool("benchmark", *args, "--modes", "infer")
    assert "peak" in isolated.stdout  # a measurement in its own process reports its peak memory
    run_tool("benchmark", *args, "--no-isolate")  # rewrites the same section
    text = out.read_text()
    assert "kernel notes" in text and "kept" in text
    assert text.count("<!-- benchmark.py:begin cpu-test -->") == 1
    section = text.split("<!-- benchmark.py:begin cpu-test -->")[1].split("<!-- benchmark.py:end cpu-test -->")[0]
    assert "python tools/benchmark.py --models test_resnet" in section and "--no-isolate" in section
    assert "| test_resnet | 0.47 | infer | 4 | 3x32x32 |" in section
    assert "| test_resnet | 0.47 | train | 4 | 3x32x32 |" in section



def test_halonet_paper_recipes_train_a_step(image_folder, tmp_path):
    """One optimizer step of each H-family recipe (its optimizer, schedule, loss and augmentation) on
    the CI-sized member of the family at its smallest input, all in one process (a start-up each
    would cost more than the steps)."""
    recipes = sorted((ROOT / "configs" / "classification").glob("halonet_paper_h*_in1k.yaml"))
    assert [r.stem for r in recipes] == [f"halonet_paper_h{h}_in1k" for h in range(8)]
    for recipe in recipes:
        assert train_tool.parse_args(["--config", str(recipe)]).model == recipe.stem[:-len("_in1k")]
    script = (
        "import sys, train\n"
        "for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        f"    train.main(['--config', recipe, '--model', 'test_halonet_paper', '--img-size', '128', '--dataset',"
        f" {str(image_folder)!r}, '--val-split', 'val', '--train-limit', '2', '--val-limit', '2', '--batch-size', '2',"
        " '--epochs', '1', '--workers', '0', '--aug-repeats', '0', '--output', out, '--experiment', 'h',"
        " '--progress', 'off'])\n"
    )
    outs = [tmp_path / r.stem for r in recipes]
    proc = subprocess.run([sys.executable, "-c", script, *[str(x) for pair in zip(recipes, outs) for x in pair]],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(_rows(out / "h")[0]["step"] == 1 for out in outs)


def test_bench_routing_peers_agree_on_cpu():
    """The op benchmark's peers (a), (b), (d) and foveal compute the same attention on the same data."""
    import bench_routing
    torch.manual_seed(0)
    B, R, T, heads, D, topk = 2, 4, 4, 2, 8, 2
    methods = bench_routing._methods(B, R, T, heads, D, topk, 0.25, [], device="cpu")
    q, k, v, idx = methods["foveal"][0]()
    ours = methods["foveal"][1](q, k, v, idx).float()  # B, R, T, heads, D
    C = heads * D
    kv = torch.cat([k.reshape(B, R, T, C), v.reshape(B, R, T, C)], -1)
    for label in ("(a) gather", "(b) gather+SDPA"):
        out = methods[label][1](q.reshape(B, R, T, C), kv, idx).float()  # B * R, heads, T, D
        torch.testing.assert_close(out.reshape(B, R, heads, T, D).transpose(2, 3), ours, rtol=2e-2, atol=2e-2)
    dense = methods["(d) dense SDPA"][1](*(t.reshape(B, R * T, heads, D).transpose(1, 2) for t in (q, k, v)))
    full = bench_routing.routed_attention(q, k, v, None, 0.25).float()
    torch.testing.assert_close(dense.float().transpose(1, 2).reshape(full.shape), full, rtol=2e-2, atol=2e-2)


def test_biformer_recipes_train_a_step(image_folder, tmp_path):
    """One optimizer step of each BiFormer recipe on the CI-sized member of the family."""
    recipes = sorted((ROOT / "configs" / "classification").glob("biformer_*_in1k.yaml"))
    assert [r.stem for r in recipes] == ["biformer_base_in1k", "biformer_small_in1k", "biformer_tiny_in1k"]
    for recipe in recipes:
        assert train_tool.parse_args(["--config", str(recipe)]).model == recipe.stem[:-len("_in1k")]
    script = (
        "import sys, train\n"
        "for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        f"    train.main(['--config', recipe, '--model', 'test_biformer', '--img-size', '64', '--dataset',"
        f" {str(image_folder)!r}, '--val-split', 'val', '--train-limit', '2', '--val-limit', '2', '--batch-size', '2',"
        " '--epochs', '1', '--workers', '0', '--aug-repeats', '0', '--output', out, '--experiment', 'b',"
        " '--progress', 'off'])\n"
    )
    outs = [tmp_path / r.stem for r in recipes]
    proc = subprocess.run([sys.executable, "-c", script, *[str(x) for pair in zip(recipes, outs) for x in pair]],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(_rows(out / "b")[0]["step"] == 1 for out in outs)

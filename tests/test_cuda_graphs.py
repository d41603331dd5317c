"""CUDA graphs over NAT / DiNAT: a plain ``torch.cuda.graph`` capture of an eager forward (inference)
and of a forward+backward (training), and ``torch.compile(mode="reduce-overhead")``.

Nothing an op keeps between calls (launch plans, index tables, the ones row of the bias
gradients) may be created while a graph is being captured: it would live in the graph's private
pool (reduce-overhead refuses such tensors) or need a host-to-device copy the capture cannot run.
The usual recipe warms the model up on a side stream first; after that, the captured graph must
replay to what eager computes. Both eager paths of the blocks are captured: one autograd node per
block (the default) and the module path (``FOVEAL_NA_BLOCK=0``).
"""
import pytest
import timm
import torch

import foveal  # noqa: F401  (registers the models)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(train: bool):
    torch.manual_seed(0)
    return timm.create_model("dinat_mini", num_classes=10, drop_path_rate=0.).cuda().train(train)


def _autocast():
    # the autocast weight cache must be off inside a capture (PyTorch's CUDA-graph notes)
    return torch.autocast("cuda", torch.bfloat16, cache_enabled=False)


def _warm(fn, n=3):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("one_node", ["1", "0"])
def test_gpu_graph_capture_inference(one_node, monkeypatch):
    monkeypatch.setenv("FOVEAL_NA_BLOCK", one_node)
    model = _model(False)
    static_x = torch.randn(2, 3, 224, 224, device="cuda")

    def fwd():
        with torch.no_grad(), _autocast():
            return model(static_x)

    _warm(fwd)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fwd()
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    ref = fwd()
    assert torch.isfinite(static_out).all()
    assert _rel(static_out, ref) < 1e-3


@pytest.mark.parametrize("one_node", ["1", "0"])
def test_gpu_graph_capture_training(one_node, monkeypatch):
    monkeypatch.setenv("FOVEAL_NA_BLOCK", one_node)
    model = _model(True)
    params = [p for p in model.parameters() if p.requires_grad]
    static_x = torch.randn(2, 3, 224, 224, device="cuda")
    static_y = torch.randint(0, 10, (2,), device="cuda")

    def step():
        with _autocast():
            loss = torch.nn.functional.cross_entropy(model(static_x).float(), static_y)
        loss.backward()
        return loss

    def zero():
        for p in params:
            p.grad = None

    _warm(lambda: (zero(), step()))
    zero()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    got = [p.grad.clone() for p in params]
    loss = static_loss.clone()
    zero()
    ref_loss = step()
    assert _rel(loss, ref_loss) < 1e-3
    for p, g in zip(params, got):
        assert torch.isfinite(g).all()
        assert _rel(g, p.grad) < 2e-2


def test_gpu_reduce_overhead_inference_and_training():
    model = _model(True)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):  # warm-up, recording, replay
        # a training loop's step: the gradients of the last replay are graph outputs that the next one
        # overwrites, so they are dropped (zero_grad(set_to_none=True)), not accumulated into
        for p in model.parameters():
            p.grad = None
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", torch.bfloat16):
            out = compiled(x)
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(x).clone()
        ref = model(x)
    assert _rel(got, ref) < 2e-2

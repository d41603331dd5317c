"""torch.compile of whole NAT / DiNAT models: one graph, no graph breaks, no recompiles across blocks.

DiNAT blocks differ only by their dilation (an int attribute of ``NeighborhoodAttention2d``, which
dynamo specializes on). If any block code broke the graph, dynamo would compile the block's frames
separately and recompile them for every distinct (dilation, width, map size) until its recompile
limit, after which the remaining blocks run eagerly. These tests pin the opposite: a whole model
(tiny test variants, blocks of dilation 1 and 2) is one frame and one graph holding every NA layer as
one ``foveal::na_fwd`` node with the block's dilation, in eval, in training (forward + backward,
through ``RecomputeMlp``'s autograd.Function and DropPath), and under bf16 autocast.

The backends are dynamo's ``eager`` / ``aot_eager`` (graph capture and AOT autograd, which is what
decides breaks and recompiles): inductor adds minutes of CPU codegen per model and is covered by
``test_nat.py::test_torch_compile_fullgraph_forward_backward``.
"""
import contextlib

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import foveal  # noqa: F401  (registers the models)
from foveal.layers import NeighborhoodAttention2d

MODELS = ['test_nat', 'test_nat_isotropic']  # both mix blocks of dilation 1 and 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    dilations = {m.dilation for m in model.modules() if isinstance(m, NeighborhoodAttention2d)}
    assert len(dilations) > 1, f'{name} should mix dilations, has {dilations}'
    return model


def _na_layers(model):
    return [m for m in model.modules() if isinstance(m, NeighborhoodAttention2d)]


class _GraphRecorder:
    """Dynamo backend that keeps every captured FX graph, then runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _na_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == 'call_function' and 'foveal.na_fwd' in str(n.target)]


def _no_graph_breaks():
    assert not counters['graph_break'], f'graph breaks: {dict(counters["graph_break"])}'


def _assert_close_grads(model, ref_grads, **tol):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n, **tol)


@pytest.mark.parametrize('name', MODELS)
def test_fullgraph_eval(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cnt = CompileCounterWithBackend('aot_eager')
        out = torch.compile(model, backend=cnt, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 1
    _no_graph_breaks()


@pytest.mark.parametrize('name', MODELS)
def test_fullgraph_train_forward_backward(name):
    model = _model(name).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cnt = CompileCounterWithBackend('aot_eager')
    out = torch.compile(model, backend=cnt, fullgraph=True)(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    _assert_close_grads(model, ref_grads, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 1
    _no_graph_breaks()


def test_fullgraph_train_with_drop_path():
    """DropPath (stochastic depth, random) in the graph: compiles whole, every parameter gets a gradient."""
    model = _model('test_nat', drop_path_rate=0.3).train()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    compiled(torch.randn(4, 3, 48, 48)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    _no_graph_breaks()


@pytest.mark.parametrize('name, autocast', [
    ('test_nat', False), ('test_nat', True), ('test_nat_isotropic', False),
], ids=['test_nat-fp32', 'test_nat-bf16-autocast', 'test_nat_isotropic-fp32'])
def test_default_compile_one_graph_no_recompiles(name, autocast):
    """Default torch.compile (graph breaks allowed): still one frame and one graph holding every NA
    layer with its own dilation, and repeated steps (eval, then train + backward) recompile only for
    the grad-mode change."""
    model = _model(name, drop_path_rate=0.1)
    layers = _na_layers(model)
    rec = _GraphRecorder()
    cnt = CompileCounterWithBackend(rec)
    compiled = torch.compile(model, backend=cnt)
    x = torch.randn(2, 3, 64, 64)
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    model.eval()
    with torch.no_grad(), ctx:
        for _ in range(3):
            compiled(x)
    assert cnt.frame_count == 1, f'eval: {cnt.frame_count} frames compiled (graph breaks or recompiles)'
    assert counters['stats']['unique_graphs'] == 1
    nodes = _na_nodes(rec.graphs[0])
    assert len(nodes) == len(layers), f'{len(nodes)} of {len(layers)} NA layers in the graph'
    # the dilation argument (index 5 of foveal::na_fwd) of each node is its block's
    assert [list(n.args[5]) for n in nodes] == [[m.dilation] * 2 for m in layers]

    model.train()
    for _ in range(2):
        with ctx:
            loss = compiled(x).float().square().mean()
        loss.backward()
    # one more frame for training: dynamo guards the grad mode (GLOBAL_STATE), not the dilations
    assert cnt.frame_count == 2, f'train: {cnt.frame_count - 1} frames compiled (graph breaks or recompiles)'
    assert counters['stats']['unique_graphs'] == 2
    _no_graph_breaks()


def test_instances_of_one_architecture_share_the_compiled_frame():
    """A fresh instance of the same model (e.g. one per benchmark measurement) hits the cache: dynamo
    guards the blocks' int attributes (dilation, dim, ...) by value, not the module objects."""
    cnt = CompileCounterWithBackend('eager')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for _ in range(2):
            torch.compile(_model('test_nat').eval(), backend=cnt)(x)
    assert cnt.frame_count == 1


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_fullgraph_dynamic_shapes(mode):
    """dynamic=True: sizes and float attributes (the layers' ``scale``) are symbolic; the NA checks must
    still trace (``math.isfinite`` on a SymFloat breaks the graph)."""
    model = _model('test_nat_isotropic')
    model.train(mode == 'train')
    cnt = CompileCounterWithBackend('eager')
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    with torch.set_grad_enabled(mode == 'train'):
        out = compiled(torch.randn(2, 3, 64, 64))
    if mode == 'train':
        out.sum().backward()
    assert cnt.frame_count == 1
    _no_graph_breaks()


def test_layers_of_different_head_dim_through_one_code_object():
    """Regional compilation (one NA layer per torch.compile): the layers share the forward's code
    object, so a second head_dim recompiles with ``scale`` made dynamic (automatic dynamic). One frame
    per layer and no graph breaks, not a break inside the op's checks and frames per call."""
    cnt = CompileCounterWithBackend('eager')
    shapes = ((32, 1), (32, 2), (32, 4), (48, 2))  # head_dim 32, 16, 8, 24
    with torch.no_grad():
        for dim, heads in shapes:
            layer = NeighborhoodAttention2d(dim, heads, 3, dilation=2).eval()
            torch.compile(layer, backend=cnt)(torch.randn(1, 8, 8, dim))
    _no_graph_breaks()
    assert cnt.frame_count == len(shapes)

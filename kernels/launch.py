"""The launch path every foveal Triton op shares: compiled kernels launched without the JIT binder,
per-shape set-ups cached, and persistent device state kept out of CUDA-graph memory pools.

A model calls each op tens of times per step, so an op's host time is part of its speed. Triton's
``kernel[grid](*args)`` binds and specializes every argument in Python on each call (tens of
microseconds for a kernel with fifty scalars), then calls the compiled launcher. :class:`Launcher`
pays that once per *specialization*: the caller passes a key that determines every specialized
property of the arguments (dtypes, integer values, pointer alignment), the first call with a key
goes through the JIT (compiling, or finding the kernel in Triton's cache) and keeps the compiled
kernel, and later calls go straight to its launcher, the way inductor's generated launchers do.
Launch hooks (profilers such as proton set them) and the interpreter (``TRITON_INTERPRET=1``)
always take the JIT path.

:func:`persistent` builds device tensors that an op keeps between calls (index tables, plans).
Such tensors must not be allocated inside a CUDA-graph memory pool: ``torch.compile(...,
mode="reduce-overhead")`` runs its warm-up with the current thread (or stream) allocating from the
graph's private pool and refuses tensors in the pool that are not graph outputs, and a plain
``torch.cuda.graph`` capture cannot run the host-to-device copies that build them. They are built
in a short-lived worker thread on its own stream, outside any pool; building one while a graph is
being captured raises with the remedy (call the op once before capturing).
"""
import contextlib
import inspect
import threading
from typing import Callable, Hashable, Optional, Sequence

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["INTERPRETING", "Launcher", "aligned", "on_device", "persistent", "raw_stream"]

try:  # Triton >= 3.4 keeps the launch hooks in knobs; older releases on CompiledKernel
    from triton import knobs as _knobs

    def _hooks():
        return _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
except ImportError:  # pragma: no cover - depends on the Triton version
    from triton.compiler import CompiledKernel as _CompiledKernel

    def _hooks():
        return _CompiledKernel.launch_enter_hook, _CompiledKernel.launch_exit_hook


def _hooked() -> bool:
    """True when a launch hook is installed (Triton >= 3.5 keeps them in chains that are never None)."""
    for hook in _hooks():
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


@triton.jit
def _mode_probe():
    pass


# Triton fixes interpreter mode when it is imported (its own library is jit-decorated too), so the
# mode is a constant: ops read it as one, and dynamo never inspects a kernel object while tracing a
# model (an ``isinstance`` on a kernel there is a graph break, and per-block graph breaks make a
# compiled model recompile each block until it falls back to eager)
INTERPRETING: bool = isinstance(_mode_probe, InterpretedFunction)


def raw_stream(device_index: int) -> int:
    """The current CUDA stream of a device as the integer handle launchers take."""
    return torch._C._cuda_getCurrentRawStream(device_index)


class _Compiled:
    __slots__ = ("run", "function", "metadata")

    def __init__(self, kernel):
        if hasattr(kernel, "result"):  # Triton's asynchronous compile returns a future
            kernel = kernel.result()
        self.run = kernel.run  # the compiled launcher (loads the module on first access)
        self.function = kernel.function
        self.metadata = kernel.packed_metadata


class Launcher:
    """Launches one ``@triton.jit`` kernel, binding its arguments once per specialization.

    ``launcher(grid, args, key, num_warps=..., num_stages=...)``: ``args`` are all the kernel's
    arguments in signature order (constexprs included, as the JIT takes them positionally); ``key``
    is any hashable that is equal for two calls only when their arguments specialize the same way:
    the same tensor dtypes, the same values of every integer argument, the same 16-byte alignment
    of every pointer, the same constexprs and options. Float arguments are not specialized and may
    vary under one key. On CUDA the current device must be the tensors' device (the callers
    guarantee it, as Triton's own launch assumes it).
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}
        self._names: Optional[tuple] = None

    @property
    def param_names(self) -> tuple:
        """The kernel's parameter names in signature order (read once: ``inspect.signature`` costs
        hundreds of microseconds, more than a launch)."""
        if self._names is None:
            self._names = tuple(inspect.signature(self.fn.fn).parameters)
        return self._names

    def __call__(self, grid: Sequence[int], args: Sequence, key: Hashable, **options) -> None:
        compiled = self._compiled.get(key)
        if compiled is not None and not _hooked():
            compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                         raw_stream(torch.cuda.current_device()), compiled.function, compiled.metadata,
                         None, None, None, *args)
            return
        kernel = self.fn[tuple(grid)](*args, **options)
        if compiled is None and not INTERPRETING and kernel is not None:
            self._compiled[key] = _Compiled(kernel)

    def cache_size(self) -> int:
        return len(self._compiled)


def aligned(*tensors: torch.Tensor) -> bool:
    """True when every tensor's data pointer is 16-byte aligned (Triton specializes on it)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


_SAME_DEVICE = contextlib.nullcontext()


def on_device(device: torch.device):
    """A context that makes ``device`` current for a launch (a no-op when it already is, or off CUDA)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device)

_BUILD_STREAMS: dict = {}


def persistent(device: torch.device, build: Callable[[], object]):
    """Runs ``build()`` (which creates device tensors an op keeps between calls) outside any
    CUDA-graph memory pool and returns its result; on the CPU it just calls ``build()``.

    Raises:
        RuntimeError: the current stream is capturing a CUDA graph (the state must exist before the
            capture: call the op once, with the same shapes, before capturing).
    """
    if device.type != "cuda":
        return build()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "foveal: a kernel set-up for a new shape was needed while a CUDA graph was being captured; "
            "run the model (or op) once with the same shapes and dtypes before capturing, e.g. the usual "
            "warm-up iterations on a side stream"
        )
    result: list = []
    error: list = []

    def work():
        try:
            with torch.cuda.device(device):
                stream = _BUILD_STREAMS.get(device)
                if stream is None:
                    stream = _BUILD_STREAMS[device] = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    result.append(build())
                stream.synchronize()
        except BaseException as err:  # re-raised in the caller's thread
            error.append(err)

    worker = threading.Thread(target=work, name="foveal-persistent")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


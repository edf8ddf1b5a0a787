"""TESTING ONLY: let Megatron-Bridge's ``pretrain()`` run on a machine without a GPU.

Megatron-Core/Bridge assume CUDA in a few places (device="cuda" tensor factories, CUDA streams and
events in DDP, ``torch.cuda.*`` memory calls, a CUDA RNG tracker). :func:`apply` patches those for
the CURRENT PROCESS so a world-size-1 gloo run of the real training loop can execute on CPU; use it
only in a dedicated subprocess (:mod:`.cpu_train`, :mod:`.engine_check`), never in a shared test process,
never on a GPU. The config side (gloo, fp32, no distributed optimizer, no grad clipping: Megatron's
clip asserts CUDA tensors) is ``to_container(..., cpu=True)``, selected by ``engine.device=cpu``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

APPLIED: list[str] = []


def _cpu_device(d):
    return "cpu" if d is not None and "cuda" in str(d) else d


def apply() -> list[str]:
    """Patch torch for this process (idempotent); returns what was patched."""
    if APPLIED:
        return APPLIED
    factories = ["tensor", "empty", "zeros", "ones", "rand", "randn", "randint", "full", "arange", "zeros_like",
                 "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "as_tensor"]

    def _wrap(fn):
        @functools.wraps(fn)
        def w(*a, **k):
            if "device" in k:
                k["device"] = _cpu_device(k["device"])
            return fn(*a, **k)

        return w

    for n in factories:
        setattr(torch, n, _wrap(getattr(torch, n)))
    orig_to = torch.Tensor.to

    def _to(self, *a, **k):
        a = tuple("cpu" if isinstance(x, (str, torch.device)) and "cuda" in str(x) else x for x in a)
        if "device" in k:
            k["device"] = _cpu_device(k["device"])
        return orig_to(self, *a, **k)

    torch.Tensor.to = _to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    for n in ["memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"]:
        setattr(torch.cuda, n, lambda *a, **k: 0)
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    APPLIED.append("device='cuda' -> cpu in tensor factories/.to/.cuda; torch.cuda memory/sync/current_device stubs")

    class _Event:
        def __init__(self, *a, **k):
            pass

        def record(self, *a, **k):
            pass

        def wait(self, *a, **k):
            pass

        def synchronize(self):
            pass

        def query(self):
            return True

        def elapsed_time(self, other):
            return 0.0

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a):
            pass

        def wait_event(self, *a):
            pass

        def synchronize(self):
            pass

        def record_event(self, *a, **k):
            return _Event()

    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    APPLIED.append("torch.cuda.Stream/Event/stream stand-ins")

    import megatron.bridge.training.setup as setup

    orig_init = setup.initialize_megatron
    setup.initialize_megatron = functools.partial(orig_init, allow_no_cuda=True)
    APPLIED.append("initialize_megatron(allow_no_cuda=True)")

    from megatron.core import tensor_parallel

    orig_seed = tensor_parallel.model_parallel_cuda_manual_seed

    def _patch_tracker():
        # a tracker whose fork() is a no-op context; its state (saved in checkpoints, which refuse to
        # resume from an empty one) is the CPU generator's
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.get_states = lambda: {"model-parallel-rng": torch.get_rng_state()}
        tracker.set_states = lambda states: None

    def _seed(*a, **k):  # no CUDA RNG
        try:
            orig_seed(*a, **k)
        except Exception:
            pass
        _patch_tracker()

    tensor_parallel.model_parallel_cuda_manual_seed = _seed
    for mod_name in ("megatron.bridge.training.initialize", "megatron.training.initialize"):
        try:
            import importlib

            mod = importlib.import_module(mod_name)
            if hasattr(mod, "model_parallel_cuda_manual_seed"):
                mod.model_parallel_cuda_manual_seed = _seed
        except Exception:
            pass
    _patch_tracker()
    tensor_parallel.convert_cuda_rng_state = lambda state, to_graphable=False: state
    APPLIED.append("RNG tracker with a no-op fork() and the CPU generator as its state")
    return APPLIED

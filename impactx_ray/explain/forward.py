"""The map engine's model call: masked images N x H x W x C -> N x K float32 logits, made fast.

The batched engine spends most of its time in the model forward (benchmarks/shap_engine.py), so
this module is where the forward gets faster, without touching the maps' definition:

* **precision** ``fp32`` (default, shap-exact: IEEE float32, TF32 off on CUDA), ``bf16`` or
  ``fp16`` (``torch.autocast``; the logits come back as float32). Reduced precision changes the
  maps (benchmarks report how much: max relative difference and Spearman rank correlation per
  map against fp32), so it is part of a map store's identity; fp32 stays the default.
* **compile**: ``torch.compile`` of the model, compiled once: every call is split into chunks of
  ``chunk`` images; on a CPU the graph's batch dimension is dynamic, so a short last chunk runs
  compiled at its own size; on CUDA the graph has one static shape, the last chunk padded to it
  (CUDA graphs replay it).
  On CUDA the eager forward runs at the static chunk size too (cuDNN plans each new batch size).
  ``"auto"`` compiles a call that sends at least :data:`AUTO_COMPILE_MIN_IMAGES` images through
  the model (about 100 maps at 2000 evaluations: a store shard, not a one-off map) where a
  compiler exists (a C++ compiler on CPU, Triton on CUDA), except fp32 on CUDA (not shap-exact
  there, see :meth:`ModelForward.select`); ``"on"`` compiles every call; ``"off"`` never. Where it
  cannot compile it says so on one line and runs the eager forward. Compiled code is cached on
  disk by torch (inductor's FX graph cache, :func:`compile_cache_dir`), so Ray workers on one
  machine compile once between them. On a CPU compiled maps equal eager ones to float rounding
  (tests: <= 1e-5 of the map's scale).
* **channels-last** weights on CUDA (:func:`default_channels_last`); the engine's masked images
  are channels-last in memory already.

Plain PyTorch: no Ray, no MLflow, no shap.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from impactx_ray.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
DEFAULT_PRECISION = "fp32"
DEFAULT_COMPILE = "auto"
#: ``compile="auto"`` compiles a call with at least this many images through the model: a 128-map
#: store shard at 2000 evaluations (256k) does, a single map or a small test never does. Measured
#: here (LeNet-5, CPU): a cold compile 34-58 s, from the disk cache 3-4 s; the compiled forward
#: 1.8-2.2x the eager one, so a call of this size repays a cached compile.
AUTO_COMPILE_MIN_IMAGES = 200_000
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Chunk sizes a CPU engine call tries (:meth:`ModelForward.probe_chunk`), when it sends at least
#: AUTO_COMPILE_MIN_IMAGES images and no ``forward_batch`` was given. Measured on the 2-core CPU:
#: MobileNet at 224 runs 85 images/s in calls of 8-16 and 51 in calls of 512 (activations out of
#: the caches); LeNet-5 at 32x32 the same from 64 to 512 and slower below.
PROBE_SIZES = (8, 16, 32, 64, 128, 256, 512)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    return precision


def check_compile(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise UserError(f"compile={mode!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_cache_dir() -> Path:
    """Where torch keeps compiled code on disk: ``$TORCHINDUCTOR_CACHE_DIR``, which torch sets on
    import to ``/tmp/torchinductor_<user>`` unless it was set before. Its FX graph and AOTAutograd
    caches are on by default, so every process of the machine (Ray workers inherit the variable)
    reuses the kernels the first one compiled; only Dynamo's tracing is redone per process."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def compile_blocker(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on this Python ({sys.version.split()[0]})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    if device.type != "cpu":
        return f"the engine compiles for cpu and cuda only, not {device.type}"
    # inductor's CPU build logs "No CUDA runtime is found, using CUDA_HOME=..." as a warning on
    # every machine without a GPU: true, and of no use to someone computing maps on a CPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler: none of its candidates answered --version
        return f"no C++ compiler found (tried {os.environ.get('CXX', 'g++')}; set CXX)"
    return None


def default_channels_last(device: torch.device) -> bool:
    """Channels-last weights on CUDA, contiguous on a CPU. Measured (benchmarks/map_table.py): the
    same forward speed either way on an H100 and on this project's CPU, for LeNet-5, MobileNet and
    EfficientNet-B2; CUDA keeps NHWC, cuDNN's native layout for its tensor-core kernels."""
    return device.type == "cuda"


_said: set[str] = set()


def say_once(message: str) -> None:
    """One line on stderr, once per process (a fallback is announced, never silent)."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """True float32 on CUDA: cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and
    later, which would put fp32 maps ~1e-3 away from shap's CPU maps. Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class ModelForward:
    """``model`` as the engines call it, with precision, layout and (optional) compilation.

    ``__call__(x_nhwc)`` takes masked images N x H x W x C on ``device`` and returns N x K logits
    (float32; a float64 model's stay float64). ``compiled`` says whether calls go through the
    compiled graph; :meth:`select` sets it per engine call from ``compile`` and the call's size.
    The compiled graph is built once per ModelForward (one per explainer: a Ray worker keeps its
    own for all its shards) and the disk cache makes a rebuild in another process cheap.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, dtype: torch.dtype = torch.float32,
                 precision: str = DEFAULT_PRECISION, compile: str = DEFAULT_COMPILE, chunk: int = 512,
                 channels_last: bool | None = None) -> None:
        self.device, self.dtype, self.chunk = torch.device(device), dtype, int(chunk)
        self.precision, self.compile_mode = check_precision(precision), check_compile(compile)
        self.channels_last = default_channels_last(self.device) if channels_last is None else bool(channels_last)
        self.model = model
        self.compiled = False
        self._net: torch.nn.Module | None = None  # the model in the chosen layout, made on first use
        self._graph = None  # torch.compile(self._net), made on first compiled call
        self._pad: torch.Tensor | None = None  # chunk x H x W x C, reused for the last chunk
        self.graph_images = self.padded_images = 0  # images through the graph, of which padding
        self.eager_images = 0  # images a compiled call sent through the eager model (batches of 1)

    def select(self, images: int) -> bool:
        """Whether a call that sends ``images`` images through the model runs compiled."""
        # auto leaves fp32 on CUDA eager: compiled fp32 maps measured up to 3.5% of the map's scale
        # from eager's there (an H100, MobileNet; inductor's own kernels) for a 1.3x faster forward,
        # and fp32 is the shap-exact setting. On a CPU they agree within 1e-6.
        exact_first = self.device.type == "cuda" and self.precision == "fp32"
        want = self.compile_mode == "on" or (
            self.compile_mode == "auto" and images >= AUTO_COMPILE_MIN_IMAGES and not exact_first)
        if want and self._graph is None:
            why = compile_blocker(self.device)
            if why is not None:
                say_once(f"impactx: torch.compile unavailable ({why}); the map engine runs the eager forward")
                self.compile_mode, want = "off", False
        self.compiled = want
        return want

    @property
    def net(self) -> torch.nn.Module:
        """The model in the chosen layout: a channels-last copy, so the caller's model is untouched."""
        if self._net is None:
            self._net = copy.deepcopy(self.model).to(memory_format=torch.channels_last) \
                if self.channels_last else self.model
        return self._net

    def _precision(self):
        if self.precision == "fp32":
            return ieee_fp32(self.device)
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    def _graph_call(self, x_nchw: torch.Tensor) -> torch.Tensor:
        if self.compile_mode == "off":  # a compile failed earlier in this call
            with self._precision():
                return self.net(x_nchw)
        if self._graph is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on a GPU
            # CUDA: one static shape (CUDA graphs); CPU: the batch dimension marked dynamic per call
            self._graph = torch.compile(self.net, dynamic=False if self.device.type == "cuda" else None, mode=mode)
        try:
            with self._precision():
                return self._graph(x_nchw).clone()  # CUDA graphs reuse their output buffer
        except Exception as err:  # a compile that failed: say why, then run eager from now on
            first = (str(err).strip().splitlines() or [""])[0][:200]
            say_once(f"impactx: torch.compile failed ({type(err).__name__}: {first}); "
                     "the map engine runs the eager forward")
            self.compile_mode, self.compiled = "off", False
            with self._precision():
                return self.net(x_nchw)

    def _chunked(self, x: torch.Tensor, graph: bool) -> torch.Tensor:
        """``x`` (N x H x W x C) in chunks of at most ``chunk`` images, through the compiled graph
        (``graph``) or the eager model.

        On a CPU the graph takes any batch size (its batch dimension is dynamic): a step's short
        last chunk runs compiled at its own size. Measured here (LeNet-5, 2 threads): the dynamic
        graph runs as fast as a static one at every size from 64 to 512, about twice the eager
        forward, where padding the tail or running it eager cost 2-10% of the engine's time.
        On CUDA every chunk has exactly ``chunk`` images, the last one padded (with the previous
        chunk's images, already valid inputs), eager ones too: CUDA graphs replay one static
        shape, and each new batch size costs cuDNN a new plan (measured on an H100, MobileNet at
        224: 2.3 s for the first call at a new size, 0.08 s after).
        """
        cuda = self.device.type == "cuda"
        out = []
        for a in range(0, len(x), self.chunk):
            part = x[a : a + self.chunk]  # k x H x W x C
            k = len(part)
            if cuda and k < self.chunk:
                if self._pad is None or self._pad.shape[1:] != part.shape[1:] or self._pad.dtype != part.dtype:
                    self._pad = torch.zeros((self.chunk, *part.shape[1:]), dtype=part.dtype, device=part.device)
                self._pad[:k] = part
                part = self._pad
                self.padded_images += self.chunk - k
            x_nchw = part.permute(0, 3, 1, 2)  # an NCHW view of channels-last memory, as the model takes it
            if graph and (cuda or k > 1):  # a batch of 1 would be a second graph (dynamo specialises 0 and 1)
                self.graph_images += len(part)
                if not cuda:
                    torch._dynamo.mark_dynamic(x_nchw, 0)
                out.append(self._graph_call(x_nchw)[:k])
            else:
                self.eager_images += k if graph else 0
                with self._precision():
                    out.append(self.net(x_nchw)[:k])
        return torch.cat(out)

    def probe_chunk(self, hwc: tuple[int, int, int], sizes: tuple[int, ...] = PROBE_SIZES,
                    seconds: float = 0.05) -> dict[int, float]:
        """Images/s of this forward (compiled or eager, as :meth:`select` left it) in calls of each
        size, smallest first, each timed for ``seconds`` and at least two calls after one warm-up
        call. Stops at a size that runs below 0.8 of the best so far: larger calls only push more
        activations out of the caches. Sets ``chunk`` to the fastest size and returns the rates.
        Random images stand in for masked ones: the forward's cost does not depend on the values.
        """
        x = torch.rand(max(sizes), *hwc, device=self.device)  # N x H x W x C
        rates: dict[int, float] = {}
        self.chunk = max(sizes)  # no call below is split
        with torch.no_grad():
            for k in sizes:
                self(x[:k])  # the first call at a size plans its kernels
                calls, start = 0, time.perf_counter()
                while calls < 2 or time.perf_counter() - start < seconds:
                    self(x[:k])
                    calls += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                rates[k] = calls * k / (time.perf_counter() - start)
                if rates[k] < 0.8 * max(rates.values()):
                    break
        self.chunk = max(rates, key=rates.get)
        return rates

    def __call__(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        """The engine's call: compiled, or on CUDA eager at the static chunk size, else eager."""
        if not self.compiled and self.device.type != "cuda":
            return self.eager(x_nhwc)
        out = self._chunked(x_nhwc.to(dtype=self.dtype), graph=self.compiled)
        return out if self.precision == "fp32" else out.float()

    def eager(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        """The uncompiled forward at any batch size (shap's engine, label checks)."""
        with self._precision():
            out = self.net(x_nhwc.to(dtype=self.dtype).permute(0, 3, 1, 2))
        return out if self.precision == "fp32" else out.float()

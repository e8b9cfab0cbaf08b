"""Fast decoding on the CPU: which dtype the machine does well, and int8 / float16-weight linear layers.

`auto_dtype()` (from `lmlab.runtime.cpu_flags()`, the CPU's bf16 and int8 flags) picks bfloat16 where the CPU has
native bf16 matmuls (AMX or AVX-512-bf16) and float32 otherwise. `quantize_int8(model)` swaps every
linear layer of the Blocks (attention and FFN projections) and the language-model head for
`Int8Linear`: weights stored in int8 with one scale per output channel, activations quantized per
tensor as they come, the product through torch's fbgemm kernels (`quantized::linear_dynamic`).
Decoding reads every weight once per token, so a quarter of the bytes is most of the win on a
memory-bound machine (docs/benchmarks.md, "Decoding speed"). Embeddings, norms, routers and grouped
MoE experts stay in floating point. The quality cost is measured: held-out perplexity within 1% of
float32 (tests/test_quantize.py).

`quantize_fp16(model)` swaps the same layers for `Fp16Linear`: weights stored in float16, activations
and accumulation in float32, through fbgemm's fp16 GEMM (`quantized::linear_dynamic_fp16`), the
precision class of llama.cpp's F16 files. Half the bytes of float32, and unlike MKL's float32 GEMV
(about 9.6 GB/s on 2 threads of an AVX-512 EPYC, against 17-19 GB/s for ONNX Runtime and llama.cpp)
fbgemm's kernel streams them near the machine's bandwidth: 3.1x F.linear's speed over a decode step's
matrices at one row (`bench/linear_orientation.py`; docs/benchmarks.md, "ONNX Runtime: export parity,
encoders and decoders against lmlab"). The only change to the result is the rounding of each weight to
float16.
"""

from __future__ import annotations

import copy
import itertools
import platform
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model.linear import Linear
from lmlab.runtime import cpu_flags, native_bf16

__all__ = [
    "DTYPES",
    "QUANTIZE",
    "Fp16Linear",
    "Int8Linear",
    "auto_dtype",
    "cpu_flags",
    "decoding_choice",
    "int8_engine",
    "native_bf16",
    "quantize_fp16",
    "quantize_int8",
    "quantize_linear",
]

QUANTIZE = ("none", "int8", "fp16")


def auto_dtype(device: str = "cpu", flags: frozenset[str] | None = None) -> torch.dtype:
    """bfloat16 on CUDA GPUs with native bf16 and on CPUs with AMX or AVX-512-bf16; float32 otherwise."""
    if device.startswith("cuda"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32  # emulated bf16 is slower than float32
    return torch.bfloat16 if native_bf16(flags) else torch.float32


def int8_engine() -> str | None:
    """The quantized engine torch can run int8 linear layers with here (fbgemm / x86 / qnnpack), or None."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    return None


# The op's C++ entry point: the Python wrappers around it check every call for traced script objects,
# which costs ~10 us a call, and a decode step makes 4 calls per layer (docs/benchmarks.md, "Decoding
# with int8 linear layers"). Under torch.compile the layers go through `packed_linear` instead.
_LINEAR_DYNAMIC_OP = torch.ops.quantized.linear_dynamic.default
_LINEAR_DYNAMIC = getattr(_LINEAR_DYNAMIC_OP, "_op", _LINEAR_DYNAMIC_OP)


_PACKED: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("lmlab::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """The packed layer registered under `key`, applied to float32 `x`: one opaque op for torch.compile.
    Dynamo cannot trace fbgemm's packed weights (a script object), so without it a compiled decode step
    breaks into a graph per layer and runs slower than eager (docs/benchmarks.md, "A static decode graph")."""
    return _PACKED[key].run(x)


@packed_linear.register_fake
def _packed_linear_fake(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class _PackedLinear(nn.Module):
    """fbgemm-packed weights behind one forward: the packed op directly in eager mode (its C++ entry
    point), `packed_linear` under torch.compile. Each layer has a key in a weak registry the op reads."""

    out_features: int

    def _register(self) -> None:
        self.key = next(_KEYS)
        _PACKED[self.key] = self

    def __deepcopy__(self, memo: dict) -> _PackedLinear:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._register()  # a copy is a layer of its own
        return new

    run: Callable[[torch.Tensor], torch.Tensor]  # (..., in) float32 -> (..., out): each kind's packed op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        y = packed_linear(x32, self.key, self.out_features) if torch.compiler.is_compiling() else self.run(x32)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class Int8Linear(_PackedLinear):
    """A linear layer with int8 weights (symmetric, one scale per output channel) and activations
    quantized per tensor on the fly; float in, float out. Built from a float weight (and bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        engine = int8_engine()
        if engine is None:
            raise ConfigError(f"torch has no int8 engine on this machine ({platform.machine()}); use float32")
        torch.backends.quantized.engine = engine
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks its quantized-tensor constructors as deprecated
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            b = None if bias is None else bias.detach().float().cpu()
            self._packed = torch.ops.quantized.linear_prepack(qw, b)
        # x86's fbgemm kernels accumulate in 16 bits on some paths: halving the activation range avoids
        # saturating them (as torch's own dynamic quantization does there)
        self.reduce_range = engine in ("x86", "fbgemm")
        self._register()

    def run(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) float32 -> (..., out)
        return _LINEAR_DYNAMIC(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


_LINEAR_FP16_OP = torch.ops.quantized.linear_dynamic_fp16.default
_LINEAR_FP16 = getattr(_LINEAR_FP16_OP, "_op", _LINEAR_FP16_OP)


class Fp16Linear(_PackedLinear):
    """A linear layer with float16 weights packed for fbgemm; float32 activations and accumulation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if int8_engine() not in ("x86", "fbgemm"):
            raise ConfigError(
                f"float16-weight layers need torch's fbgemm kernels (x86 CPUs); this is {platform.machine()}"
            )
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        self._packed = torch.ops.quantized.linear_prepack_fp16(w, None if bias is None else bias.detach().float().cpu())
        self._register()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return _LINEAR_FP16(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weights"


_KINDS = {"int8": Int8Linear, "fp16": Fp16Linear}


def quantize_linear(model: nn.Module, kind: str) -> int:
    """Swap the attention and FFN projections (lmlab's Linear; MoE routers and gates, whose choices
    must not move, stay float) and the language-model head for Int8Linear (kind "int8") or Fp16Linear
    ("fp16"), in place, for inference on the CPU. Returns how many layers were swapped."""
    if kind not in _KINDS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError(f"{kind} linear layers run on the CPU; load the model there")
    layer = _KINDS[kind]
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Linear:  # the projections; routers, gates and task heads are plain nn.Linear
                setattr(parent, name, layer(child.weight, child.bias))
                swapped += 1
    head = getattr(model, "lm_head", None)
    if head is not None:
        weight = head.weight if head.weight is not None else model.tok_embed.weight
        head.packed = layer(weight, head.bias)
        swapped += 1
    model.eval()
    return swapped


def quantize_int8(model: nn.Module) -> int:
    """quantize_linear(model, "int8"): int8 weights per output channel, activations per tensor."""
    return quantize_linear(model, "int8")


def quantize_fp16(model: nn.Module) -> int:
    """quantize_linear(model, "fp16"): float16 weights, float32 activations and accumulation."""
    return quantize_linear(model, "fp16")


DTYPES = ("auto", "float32", "bfloat16")


def decoding_choice(
    dtype: str | torch.dtype = "auto",
    quantize: str | None = "none",
    flags: frozenset[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, str]:
    """What a decoding process runs in: {"dtype", "quantize", "why"} from the asked `dtype` (auto,
    float32, bfloat16 or such a torch.dtype) and `quantize` (none / None, int8 or fp16). auto is bfloat16
    where matmuls in it are native (CUDA GPUs with bf16; CPUs with AMX / AVX-512-bf16) and float32
    otherwise; int8 and fp16 (weights) run their activations in float32 (CPU only)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    quantize = "none" if quantize is None else quantize
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is unknown; expected one of {', '.join(DTYPES)} or a torch.dtype")
    kind = torch.device(device).type
    if kind == "cuda":
        if quantize != "none":
            raise ConfigError(f"quantize {quantize} runs on the CPU (torch's fbgemm / x86 kernels), not on a GPU")
        if dtype == "auto":
            name = "bfloat16" if auto_dtype("cuda") == torch.bfloat16 else "float32"
            return {"dtype": name, "quantize": "none", "why": f"auto on the GPU: {name}"}
        return {"dtype": dtype, "quantize": "none", "why": "as asked"}
    flags = cpu_flags() if flags is None else flags
    shown = ", ".join(sorted(flags)) or "no AVX flags read"
    if quantize == "int8":
        if int8_engine() is None:
            raise ConfigError(f"--quantize int8: torch has no int8 engine on this machine ({platform.machine()})")
        return {"dtype": "float32", "quantize": "int8", "why": f"int8 linear layers ({int8_engine()}); CPU: {shown}"}
    if quantize == "fp16":
        if int8_engine() not in ("x86", "fbgemm"):
            raise ConfigError(f"--quantize fp16 needs torch's fbgemm kernels (x86 CPUs); this is {platform.machine()}")
        return {"dtype": "float32", "quantize": "fp16", "why": f"float16-weight linear layers (fbgemm); CPU: {shown}"}
    if dtype == "auto":
        if native_bf16(flags):
            return {"dtype": "bfloat16", "quantize": "none", "why": f"native bf16 matmuls; CPU: {shown}"}
        return {"dtype": "float32", "quantize": "none", "why": f"no native bf16 matmuls; CPU: {shown}"}
    return {"dtype": dtype, "quantize": "none", "why": f"as asked; CPU: {shown}"}

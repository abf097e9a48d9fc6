"""Numeric precision of inference: float32, or bfloat16 activations where the processor computes them natively.

On a CPU with AVX512-BF16 or AMX-BF16 instructions, a network whose weights and inputs are bfloat16 runs
its convolutions about twice as fast as in float32 (the segmentation U-Net on this project's 2-core AMD EPYC:
0.31 -> 0.13 s per batch of 8 at 320²). The segmentation predictor runs bfloat16 copies of its networks
(:func:`inference_dtype`); the lesion Mask R-CNN runs under PyTorch's :func:`autocast` (convolutions and
linear layers in bfloat16; box coding, NMS and RoI Align in float32). Without those instructions bfloat16 is
emulated and slower, so ``"auto"`` picks it only where it is native. Its cost in accuracy was measured, not
assumed (``benchmarks/precision.py``, ``benchmarks/RESULTS.md``). Classifiers and training run in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU with AVX512-BF16 or AMX-BF16 (CUDA: not used by
    ``"auto"``; False)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):   # older PyTorch: no capability query, assume emulated
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"fp32"`` or ``"bf16"``: ``"auto"`` is bf16 where :func:`native_bf16`, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu") -> Iterator[None]:
    """Inside, the operations PyTorch's autocast lists run in bfloat16 when ``precision`` (resolved) is
    ``"bf16"``; nothing changes for ``"fp32"``. Callers turn floating outputs back to float32."""
    if precision == "bf16":
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


def inference_dtype(precision: str) -> torch.dtype:
    """The weights' and inputs' dtype for a resolved ``precision`` (``"fp32"`` or ``"bf16"``)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

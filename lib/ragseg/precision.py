"""Which float type decoder fine-tuning computes in.

bfloat16 autocast (weights, optimizer state and the loss stay float32) speeds a fine-tuning step
up on CPUs that multiply bfloat16 natively (AVX512-BF16 or AMX) and on CUDA devices that support
it. Elsewhere oneDNN emulates bfloat16, which is no faster than float32, so ``"auto"`` keeps
float32 there: the same code runs everywhere and only the speed differs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

from .defaults import FINETUNE_PRECISIONS as PRECISIONS

logger = logging.getLogger(__name__)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 dot-product instructions and oneDNN may use them."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    try:  # _is_mkldnn_bf16_supported is also True for plain AVX512, where bfloat16 is emulated
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell here, stay with float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """``"bf16"`` or ``"float32"`` for a requested ``precision`` (one of :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "float32"
    return "bf16" if dev.type == "cpu" and cpu_has_native_bf16() else "float32"


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context for a resolved ``precision`` (a no-op for float32)."""
    dev = torch.device(device)
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

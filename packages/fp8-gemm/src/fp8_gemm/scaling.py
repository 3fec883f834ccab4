"""Delayed scaling: quantize with a scale derived from the absolute maxima of earlier calls.

Dynamic per-tensor scaling reads a tensor twice (amax, then cast). Delayed scaling (as in Transformer Engine)
uses the largest amax of the last ``history_len`` calls instead, and records this call's amax for the next
one: one read, in one kernel launch that also keeps the history on the device. A value beyond the delayed
scale's range is caught in the kernel: the scale is raised so nothing clips (or ``NumericalOverflowError`` in
strict mode). Everything stays on the device; no call synchronizes unless
``strict`` is set.
"""

from __future__ import annotations

import torch
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.models import FP8Format

from .quantize import _quantize_delayed


class DelayedScaler:
    """Per-tensor FP8 scales from an amax history window, for repeated quantization of similar tensors.

    Args:
        fmt: ``"e4m3"`` or ``"e5m2"``.
        history_len: how many past calls' amax the scale covers (at least 1).
        margin: headroom in powers of two: the scale is ``max(history) / max_value * 2**margin``.
        strict: raise ``NumericalOverflowError`` when a call's values exceed the delayed scale's range
            (the default raises the scale instead, so nothing clips).

    ``quantize(t)`` returns ``(quantized, scale)`` like :func:`fp8_gemm.quantize_fp8`; the first call (empty
    history) scales dynamically.
    """

    def __init__(self, fmt: str | FP8Format = "e4m3", history_len: int = 16, *, margin: int = 0,
                 strict: bool = False) -> None:
        if not isinstance(history_len, int) or isinstance(history_len, bool) or history_len < 1:
            raise InvalidArgumentError(f"history_len: expected an integer >= 1, got {history_len!r}")
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise InvalidArgumentError(f"margin: expected an integer >= 0, got {margin!r}")
        self.fmt = FP8Format.from_name(fmt)
        self.history_len = history_len
        self.margin = margin
        self.strict = strict
        self.amax_history: torch.Tensor | None = None
        self._state: torch.Tensor | None = None  # the kernel's barrier words and its call count
        self.calls = 0

    def reset(self) -> None:
        """Forget the history: the next call scales dynamically."""
        self.amax_history = None
        self._state = None
        self.calls = 0

    def scale(self) -> torch.Tensor | None:
        """The scale the next call will use (``[1]`` float32 on the history's device), or None before any call."""
        if self.amax_history is None or self.calls == 0:
            return None
        amax = self.amax_history.amax().reshape(1)
        # Tensor / tensor: CUDA's division by a Python scalar multiplies by its reciprocal (not IEEE division).
        dyn = torch.div(amax, torch.full_like(amax, self.fmt.max_value)).clamp_min(2.0**-126) * float(2**self.margin)
        return torch.where(amax > 0, dyn, torch.ones_like(dyn))

    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``t`` per tensor with the delayed scale and record its amax: one kernel launch that reads
        ``t`` once (twice on the first call, or when ``t`` outgrows the history's range), with the history kept
        and updated on the device (no host synchronization unless ``strict``)."""
        if self.amax_history is None:
            self.amax_history = torch.zeros(self.history_len, dtype=torch.float32, device=t.device)
            self._state = torch.zeros(4, dtype=torch.int32, device=t.device)
        elif self.amax_history.device != t.device:
            self.amax_history = self.amax_history.to(t.device)
            self._state = self._state.to(t.device)
        q, s = _quantize_delayed(t, self.fmt, self.amax_history, self._state, self.margin, self.strict)
        self.calls += 1
        return q, s

    __call__ = quantize

    def __repr__(self) -> str:
        return (f"DelayedScaler(fmt={self.fmt.name!r}, history_len={self.history_len}, margin={self.margin}, "
                f"strict={self.strict}, calls={self.calls})")


ScaleTracker = DelayedScaler

__all__ = ["DelayedScaler", "ScaleTracker"]

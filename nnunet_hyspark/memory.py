"""The one training-memory estimate type, and the byte sizes every method's estimator counts with.

Each method estimates the GPU memory of fine-tuning its network (mixed precision, AdamW) as

    total = overhead + parameter_state + fragmentation * batch_size * activations_per_sample

and returns a :class:`MemoryEstimate`; the planners choose patch and batch size from it. The
per-method counts live in ``nnunet_hyspark/methods/<method>/memory.py``. GB means 2**30 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = float(2 ** 30)
HALF = 2  # bytes of an autocast (fp16 / bf16) element
FLOAT = 4  # fp32
INDEX = 8  # int64 (max-pool indices, CE target)

BYTES_PER_PARAMETER = 4 + 4 + 8 + 2  # weights, grads, AdamW exp_avg + exp_avg_sq, autocast fp16 weight cache
FRAGMENTATION = 1.2  # the caching allocator's fragmentation plus transient gradient buffers during backward
OVERHEAD_GB = 1.0  # CUDA context, cuDNN / cuBLAS handles and workspaces


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of the estimate (see the module docstring)."""

    activations_per_sample: float
    batch_size: int
    parameters: int
    parameter_state: float
    overhead: float
    fragmentation: float = FRAGMENTATION

    @property
    def activations(self) -> float:
        return self.fragmentation * self.batch_size * self.activations_per_sample

    @property
    def total(self) -> float:
        return self.overhead + self.parameter_state + self.activations

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def max_batch_size(self, target_gb: float) -> int:
        """Largest batch size whose estimate stays within ``target_gb`` (0 if not even one sample fits)."""
        free = target_gb * GB - self.overhead - self.parameter_state
        return max(0, int(free // (self.fragmentation * self.activations_per_sample)))

    def __str__(self) -> str:
        return (f"{self.total_gb:.1f} GB (activations {self.activations / GB:.1f} GB for batch {self.batch_size}, "
                f"{self.parameters / 1e6:.1f} M parameters {self.parameter_state / GB:.2f} GB, "
                f"overhead {self.overhead / GB:.1f} GB)")


def adamw_estimate(activations_per_sample: float, batch_size: int, parameters: int) -> MemoryEstimate:
    """The estimate with this module's AdamW parameter state, overhead and fragmentation."""
    return MemoryEstimate(activations_per_sample=activations_per_sample, batch_size=int(batch_size),
                          parameters=parameters, parameter_state=float(BYTES_PER_PARAMETER * parameters),
                          overhead=OVERHEAD_GB * GB)

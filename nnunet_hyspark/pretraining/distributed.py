"""torch.distributed plumbing for pre-training under ``torchrun`` (nothing home-made for transport).

``DistContext.from_environment()`` reads torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK), joins the process group (NCCL on CUDA, gloo on CPU), and wraps the
model in DistributedDataParallel with synchronised BatchNorm. Without torchrun it
is a no-op context of world size 1.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_type: str) -> "DistContext":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP with synchronised BatchNorm when distributed; the model itself otherwise."""
        if not self.enabled:
            return model
        model = convert_sync_batchnorm(model, device)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar over ranks (for logging)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def from_main(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (any picklable object; the others pass anything, e.g. None)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, wait_for_peers: bool = True) -> None:
        """Leave the process group. Ranks first meet at a barrier: a gloo rank that tears down
        its connections while a peer still uses them can abort the peer (seen as SIGABRT in CI).
        Pass ``wait_for_peers=False`` when leaving on an error, which the peers may never reach."""
        if not (self.enabled and dist.is_initialized()):
            return
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


class GlooSyncBatchNorm(nn.BatchNorm3d):
    """BatchNorm whose batch statistics are all-reduced over ranks, for CPU/gloo runs.

    torch's ``SyncBatchNorm`` supports only accelerator tensors; this one uses the
    autograd-aware ``torch.distributed.nn.all_reduce`` so gradients flow through the
    global statistics exactly as with one process holding the whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, 2, 3, 4]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        with warnings.catch_warnings():  # its deprecation points to a private module; this is the public API
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
            self.num_batches_tracked += 1
        shape = (1, c, 1, 1, 1)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on accelerators, :class:`GlooSyncBatchNorm` on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm3d) and not isinstance(child, GlooSyncBatchNorm):
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model

"""Just enough ``torch.distributed`` for ``generate`` and ``fid`` under ``torchrun``.

A process group is created only when the environment says there is more than one process
(``WORLD_SIZE > 1``, as set by ``torchrun``): NCCL when the work runs on CUDA, gloo on CPU.  A group
that the caller already initialised is used as it is (and left alone at the end).  With one process
every collective below is a no-op, so the same code runs with and without ``torchrun``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistContext", "setup", "env_world_size"]


def env_world_size() -> int:
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@dataclass
class DistContext:
    """Rank, world size and the device this process works on (``cuda:LOCAL_RANK`` under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors must live: the CUDA device for NCCL, else CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; returns a tensor on ``tensor``'s device (the input may be copied)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        t = tensor.to(self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def sum_ints(self, *values: int) -> list[int]:
        t = self.all_reduce_sum(torch.tensor(list(values), dtype=torch.int64))
        return [int(v) for v in t.tolist()]

    def failures(self, error: str | None) -> list[tuple[int, str]]:
        """Every rank's ``error`` (None: it succeeded), gathered on every rank: ``(rank, error)`` of
        the ranks that failed.  A collective: a rank that failed calls it too (instead of raising
        first), so the others learn of the failure at once instead of waiting in a later collective
        until the process group's timeout."""
        if not self.distributed:
            return [] if error is None else [(self.rank, error)]
        import torch.distributed as dist

        errors: list = [None] * self.world_size
        dist.all_gather_object(errors, error)
        return [(r, e) for r, e in enumerate(errors) if e is not None]

    def broadcast_object(self, obj=None):
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup(device=None) -> DistContext:
    """The distributed context of this process; initialises a process group when needed.

    ``device``: where this rank works.  Default: ``cuda:LOCAL_RANK`` when CUDA is available, else
    CPU.  A bare ``"cuda"`` becomes ``cuda:LOCAL_RANK`` when several processes run.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()
                                  if torch.cuda.is_available() else 0)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device,
                           dist.get_backend(), owns_group=False)
    if world == 1:
        return DistContext(0, 1, 0, device, None, owns_group=False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend=backend, **kwargs)
    except TypeError:  # older torch without device_id
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, owns_group=True)

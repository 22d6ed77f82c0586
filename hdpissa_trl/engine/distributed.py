"""The ``torch.distributed`` plumbing shared by the fold and the consistency check.

Whether a process group is running (one spelling for the whole package), this device's rank and the world size, the
flat all-gather both use, the error that names the rank and step when a collective fails, and the end of a run that
cannot deadlock gloo's teardown (:func:`shutdown_distributed`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is usable here and a default process group has been initialised."""
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group=None) -> tuple[int, int]:
    """``(K, k)`` of ``group`` (default: the world); ``(1, 0)`` when no process group is running."""
    if is_distributed():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def all_gather_flat(out: torch.Tensor, local: torch.Tensor, group=None) -> None:
    """One flat all-gather (``all_gather_single`` where torch has it; it replaced ``all_gather_into_tensor``)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, local, group=group)


class CollectiveError(RuntimeError):
    """A collective of the fold or of the consistency check failed: a peer died or hangs, or the timeout ran out."""


@contextlib.contextmanager
def collective_errors(what: str, step: int | None, group=None):
    """Re-raise a failed collective (gloo/NCCL timeout, closed connection) as a :class:`CollectiveError` that says
    which rank and step, and how to give a slow peer more time. torch's own message names neither."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and the gloo/NCCL errors are RuntimeErrors
        world, rank = world_and_rank(group)
        raise CollectiveError(
            f"HD-PiSSA {what} at step {step} failed on rank {rank} of {world}: {exc}. Another process probably died "
            f"or hangs (read its log), or did not reach this step within the process-group timeout. To give slow "
            f"steps more time raise `ddp_timeout` (seconds) in the training arguments (or `timeout=` of "
            f"torch.distributed.init_process_group)."
        ) from exc


def _ddp_modules(owners: tuple[Any, ...]) -> list[torch.nn.parallel.DistributedDataParallel]:
    """The DDP wrappers reachable from ``owners``: the objects themselves, a trainer's ``model_wrapped`` / ``model``,
    and the models an ``Accelerator`` (or a trainer's ``accelerator``) prepared."""
    found: dict[int, torch.nn.parallel.DistributedDataParallel] = {}
    for owner in owners:
        accelerator = getattr(owner, "accelerator", owner)
        candidates = [owner, getattr(owner, "model_wrapped", None), getattr(owner, "model", None),
                      *getattr(accelerator, "_models", ())]
        for obj in candidates:
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                found[id(obj)] = obj
    return list(found.values())


def shutdown_distributed(*owners: Any) -> None:
    """End a run's ``torch.distributed`` use: free the C++ reducers of the DDP modules reachable from ``owners`` (a
    trainer, an ``Accelerator``, a DDP module), then destroy the process groups. Call it once, after the last
    collective; the DDP modules found cannot run a backward pass afterwards. No-op without a process group.

    Why not just ``destroy_process_group()`` (accelerate's ``end_training``): a DDP module's C++ ``Reducer`` holds the
    process group too. When it is the last holder (the trainer goes out of scope after the group was destroyed), the
    group's destructor runs with the GIL held and joins gloo's worker threads, while a worker that is still freeing a
    finished all-gather waits for the GIL to release that collective's Python tensors: both wait forever. Seen in CI
    at the end of a 2-process LoRA-baseline recipe launch, reproduced here in 2 of 65 such launches (and within 18
    cycles by ``tests/test_distributed.py``'s stress loop without this order). torch releases the GIL only when the
    last holder is the Python ``ProcessGroup`` object, so the reducers go first, while torch's registry still holds
    the group, and the group is destroyed after them.
    """
    if not is_distributed():
        return
    for ddp in _ddp_modules(owners):
        # DDP keeps its Reducer in these two attributes (``logger`` wraps the same Reducer); nothing else owns it.
        for name in ("reducer", "logger"):
            ddp.__dict__.pop(name, None)
    # torch's registry now holds the last references: the Python ProcessGroup objects, whose release (inside
    # destroy_process_group) runs gloo's destructor with the GIL released.
    dist.destroy_process_group()

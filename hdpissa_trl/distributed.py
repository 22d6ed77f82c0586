"""The ``torch.distributed`` plumbing shared by the fold and the consistency check.

Whether a process group is running (one spelling for the whole package), this device's rank and the world size, the
flat all-gather both use, and the error that names the rank and step when a collective fails.
"""

from __future__ import annotations

import contextlib

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

"""Checkpoints of a row-sharded HD-PiSSA run through ``torch.distributed.checkpoint`` (DCP): every rank writes its rows.

One checkpoint directory holds, in DCP's format (one file per rank plus ``.metadata``):

* ``model``: the model's sharded state dict (W and every other weight as FSDP2 DTensors), without the adapters;
* ``hdpissa``: the engine's state (:meth:`ShardedHDPiSSAEngine.state_dict`): ``A0_all``, ``B0_all`` and the
  precision state (fp32 master / Kahan compensation) as row-sharded DTensors, each rank's own ``B0_j``;
* ``optimizer_rank{j}``: every device's optimizer state (its adapters are its own, so one key per rank);

plus ``hdpissa_sharded.json`` (K, r, precision, layers, step) and a ``CHECKPOINT_COMPLETE`` marker. Writes are
atomic: DCP writes into a hidden ``.tmp-<name>`` directory that rank 0 renames into place once every rank has
confirmed it sees every rank's files there (storage that every machine shares; else every rank raises and nothing is
marked complete). A checkpoint being replaced stays under ``.old-<name>`` until the new one is in place.
Resuming needs the same K (each device's slice, optimizer state and ``B0`` rows belong to one of K devices); another
K is refused with the way out (the merged model of ``save_model``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..engine.layer import plain_key
from ..engine.model import check_resume_config
from ..engine.sharded import ShardedHDPiSSAEngine, reshard_all
from .replace import replace_directory, restore_replaced, wait_until_everyone_sees

META_NAME = "hdpissa_sharded.json"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
FORMAT = "hdpissa-sharded-dcp/1"


def _model_state(engine: ShardedHDPiSSAEngine) -> dict[str, torch.Tensor]:
    """The model's sharded state dict without the per-device adapter tensors (they are reset from the factors)."""
    reshard_all(engine.model)
    return {k: v for k, v in engine.model.state_dict().items() if plain_key(k) is not None}


def _checkpoint_state(engine: ShardedHDPiSSAEngine, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": _model_state(engine), "hdpissa": engine.state_dict()}
    if optimizer is not None:
        state[f"optimizer_rank{engine.rank}"] = optimizer.state_dict()
    return state


def _barrier(group) -> None:
    dist.barrier(group=group)


def _missing_files(target: str, metadata) -> list[str]:
    """The files of a DCP checkpoint (every rank's, from the global metadata ``dcp.save`` returns on every rank, and
    ``.metadata``) that this rank cannot see in ``target`` complete: absent, or shorter than what was written."""
    ends: dict[str, int] = {".metadata": 0}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    missing = []
    for name, end in sorted(ends.items()):
        path = os.path.join(target, name)
        if not os.path.isfile(path) or os.path.getsize(path) < end:
            missing.append(name)
    return missing


def confirm_files_everywhere(missing: Callable[[], list[str]], group, where: str, device=None) -> None:
    """Collective: every rank says whether it sees all the files of the checkpoint being written (retried for
    ``FILES_VISIBLE_WAIT_S``); if one does not, every rank raises, before anything is marked complete, published or
    rotated."""

    def blind_ranks(flag: bool) -> list[int]:
        table = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(table, torch.tensor([int(flag)], dtype=torch.int64, device=device), group=group)
        return [k for k, f in enumerate(table.tolist()) if f]

    blind, missing = wait_until_everyone_sees(missing, blind_ranks)
    if blind:
        mine = f" (this rank, {dist.get_rank(group)}, misses {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})"
        raise RuntimeError(
            f"Checkpoint {where} was not published: rank(s) {blind} cannot see every process's files of it"
            f"{mine if missing else ''}. With W sharded by rows (FSDP2) every process writes its rows into the same "
            f"checkpoint and a resume reads all of them, so output_dir must be on storage that every machine shares "
            f"(save_on_each_node cannot help: no node would hold a whole checkpoint). Earlier checkpoints were left "
            f"as they were."
        )


def save_sharded_checkpoint(checkpoint_dir: str | os.PathLike, engine: ShardedHDPiSSAEngine,
                            optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                            atomic: bool = True) -> None:
    """Collective: write a checkpoint of a sharded run into ``checkpoint_dir`` (replaced if it exists).

    Call at an optimizer-step boundary (after the fold). ``extra``: JSON-able info stored in the metadata file. With
    ``atomic`` the files go to a hidden sibling directory renamed into place, with the ``CHECKPOINT_COMPLETE`` marker,
    once every rank has confirmed it sees every rank's files there (an existing ``checkpoint_dir`` is kept under
    ``.old-NAME`` until the new one is in place); ``atomic=False`` writes into ``checkpoint_dir`` directly (for a
    caller such as the trainer that already writes into a temporary directory and marks it complete itself). The
    directory must be on a file system every rank can reach (shared storage across machines): if a rank cannot see
    all files, every rank raises and nothing is marked complete or replaced.
    """
    group, rank = engine.group, dist.get_rank(engine.group)
    final = os.path.abspath(os.fspath(checkpoint_dir))
    parent, name = os.path.split(final)
    target = os.path.join(parent, f".tmp-{name}") if atomic else final
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        if atomic:
            restore_replaced(final)  # a crash while an earlier save replaced it: put the old copy back first
            shutil.rmtree(target, ignore_errors=True)  # leftover of a save that crashed: never complete
    _barrier(group)
    metadata = dcp.save(_checkpoint_state(engine, optimizer), checkpoint_id=target, process_group=group)
    device = engine.layers[0].A0_all.device if engine.layers else None
    confirm_files_everywhere(lambda: _missing_files(target, metadata), group, final, device)
    if rank == 0:
        meta = {"format": FORMAT, **engine.metadata(), "has_optimizer": optimizer is not None, "extra": extra or {}}
        with open(os.path.join(target, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        if atomic:
            with open(os.path.join(target, COMPLETE_MARKER), "w") as f:
                f.write(str(engine.step))
                f.flush()
                os.fsync(f.fileno())
            replace_directory(target, final)
    _barrier(group)


def read_sharded_metadata(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The metadata of a sharded checkpoint, or ``None`` when ``checkpoint_dir`` is not one."""
    path = os.path.join(os.fspath(checkpoint_dir), META_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_resumable(meta: dict, engine: ShardedHDPiSSAEngine, checkpoint_dir: str) -> None:
    """Refuse, before anything is loaded, a checkpoint of another K, r, precision or layer set, or of any other
    ``HDPiSSAConfig`` field but the operational ones (the replicated engine's rule, :func:`check_resume_config`)."""
    now = engine.metadata()
    if meta.get("world_size") != now["world_size"]:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: it was written by K={meta.get('world_size')} devices, this run has "
            f"K={now['world_size']}. Each device's adapter slice, its optimizer state and its rows of B0 belong to one "
            f"of the K devices, so an HD-PiSSA run resumes with the same number of processes "
            f"(--num_processes {meta.get('world_size')}). To continue with another K, save the merged model of that "
            f"run (save_model) and start a new run from it."
        )
    for key, what in (("r", "per-device rank r"), ("lora_alpha", "lora_alpha (the factors A0, B0 depend on it)"),
                      ("factor_convention", "factor convention (another hdpissa_trl version)"),
                      ("precision", "precision mode"),
                      ("layers", "set of adapted layers (another model or target_modules?)")):
        if meta.get(key) != now[key]:
            got, want = meta.get(key), now[key]
            if key == "layers":
                got, want = f"{len((got or '').split(','))} layers", f"{len(engine.names)} layers"
            raise ValueError(f"Cannot resume from {checkpoint_dir}: it was made with a different {what} "
                             f"(checkpoint: {got}, now: {want}).")
    check_resume_config(meta, engine.config)


def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (one zero-gradient step at lr 0) so DCP can load into them."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _validated_metadata(checkpoint_dir: str, engine: ShardedHDPiSSAEngine) -> dict:
    if not os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER)):
        raise ValueError(f"Checkpoint {checkpoint_dir} is incomplete (no {COMPLETE_MARKER}): it was interrupted while "
                         f"being written. Resume from an earlier checkpoint.")
    meta = read_sharded_metadata(checkpoint_dir)
    if meta is None or meta.get("format") != FORMAT:
        raise ValueError(f"{checkpoint_dir} is not a sharded HD-PiSSA checkpoint (no {META_NAME} of format "
                         f"{FORMAT!r}). A checkpoint of a run with replicated W resumes without FSDP; one of a run "
                         f"with FSDP2 resumes with FSDP2.")
    check_resumable(meta, engine, checkpoint_dir)
    return meta


def load_sharded_checkpoint(checkpoint_dir: str | os.PathLike, engine: ShardedHDPiSSAEngine,
                            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Collective: restore W, the engine state and (given ``optimizer``) this device's optimizer state.

    Returns the checkpoint metadata. Clear errors for an incomplete checkpoint or one of another K / r / precision /
    layer set, before anything is loaded. Resume is exact: the next steps give the same bits as an uninterrupted run.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    restore_replaced(checkpoint_dir)  # a crash while a save replaced it left the old copy under .old-NAME
    meta = _validated_metadata(checkpoint_dir, engine)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise ValueError(f"Cannot resume the optimizer from {checkpoint_dir}: it was saved without optimizer state.")
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = _checkpoint_state(engine, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_dir, process_group=engine.group)
    engine.load_state_dict(state["hdpissa"], step=int(meta["step"]))
    if optimizer is not None:
        optimizer.load_state_dict(state[f"optimizer_rank{engine.rank}"])
    engine.check_consistency(engine.step, on_mismatch="raise")
    return meta


def load_sharded_optimizer(checkpoint_dir: str | os.PathLike, engine: ShardedHDPiSSAEngine,
                           optimizer: torch.optim.Optimizer) -> None:
    """Collective: restore only this device's optimizer state (the trainer loads it after the model)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    meta = _validated_metadata(checkpoint_dir, engine)
    if not meta.get("has_optimizer"):
        raise ValueError(f"Cannot resume the optimizer from {checkpoint_dir}: it was saved without optimizer state.")
    _materialize_optimizer_state(optimizer)
    key = f"optimizer_rank{engine.rank}"
    state = {key: optimizer.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint_dir, process_group=engine.group)
    optimizer.load_state_dict(state[key])

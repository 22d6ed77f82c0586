"""Checkpoints of an HD-PiSSA run: written atomically, resumed exactly, refused clearly when they do not fit.

A checkpoint directory holds what ``transformers.Trainer`` writes (the model's weights in the TRAINING precision, plain
keys, possibly sharded; scheduler, RNG states, ``trainer_state.json``) plus:

* ``hdpissa_state.safetensors``: every device's initial factors ``A0/B0`` (W's initial SVD is gone after training),
  the precision state (fp32 master, Kahan compensation) and the whole :class:`HDPiSSAConfig` (written once);
* ``optimizer_rank{k}.pt``: EVERY device's optimizer state (the adapters are per device);
* ``CHECKPOINT_COMPLETE``: written last. The checkpoint is built in ``.tmp-checkpoint-N/`` and renamed into place only
  when every rank has finished, so a crash mid-save never leaves a ``checkpoint-N`` that looks complete.

:class:`CheckpointMixin` holds the ``Trainer`` overrides; the functions below do the work and are tested alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from ..engine.layer import plain_key
from ..engine.model import HDPiSSAEngine
from .replace import replace_directory, restore_replaced_checkpoints, wait_until_everyone_sees

HDPISSA_STATE_NAME = "hdpissa_state.safetensors"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
TRAINER_STATE_NAME = "trainer_state.json"
logger = logging.get_logger(__name__)


def optimizer_state_name(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


# -- writing ------------------------------------------------------------------------------------------------------

def remove_stale_temp_checkpoints(run_dir: str) -> None:
    """Delete leftovers of saves that crashed (``.tmp-checkpoint-*``): never complete, never resumed from. A checkpoint
    a crash left under ``.old-checkpoint-*`` while it was being replaced is put back first
    (:func:`~hdpissa_trl.trainer.replace.restore_replaced`)."""
    if not os.path.isdir(run_dir):
        return
    restore_replaced_checkpoints(run_dir)
    for entry in os.listdir(run_dir):
        if entry.startswith(f".tmp-{PREFIX_CHECKPOINT_DIR}-"):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def save_engine_state(engine: HDPiSSAEngine, ckpt_dir: str) -> None:
    """Write the engine's state (identical on every device: call on the saving rank only)."""
    from safetensors.torch import save_file

    state = engine.state_dict()
    save_file(state["tensors"], os.path.join(ckpt_dir, HDPISSA_STATE_NAME), metadata=state["metadata"])


def save_optimizer_state(optimizer: torch.optim.Optimizer, ckpt_dir: str, rank: int) -> None:
    """Write this device's optimizer state (every rank calls it: each device's state is its own)."""
    torch.save(optimizer.state_dict(), os.path.join(ckpt_dir, optimizer_state_name(rank)))


def mark_complete(ckpt_dir: str, info: dict) -> None:
    """Write the completion marker, flushed to disk: the last file of a checkpoint."""
    with open(os.path.join(ckpt_dir, COMPLETE_MARKER), "w") as f:
        json.dump({**info, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: str, final: str) -> None:
    """Rename a complete checkpoint into place (replacing an older one of the same step: :func:`replace_directory`)
    and drop its temp parent."""
    replace_directory(tmp, final)
    shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)


@contextlib.contextmanager
def writes_on_each_node(trainer):
    """With ``save_on_each_node=True`` every node's saving rank writes the model files of its own copy.

    transformers' ``save_pretrained`` writes on global rank 0 only (``should_save_on_this_rank``), whatever
    ``is_main_process`` says, so the other nodes' checkpoints would lack their weights and could not resume.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not (trainer.args.save_on_each_node and trainer.args.should_save and hasattr(model, "should_save_on_this_rank")):
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank


# -- reading ------------------------------------------------------------------------------------------------------

def _weight_files(ckpt_dir: str) -> dict[str, str]:
    """Plain tensor name -> the safetensors file holding it: one ``model.safetensors`` or the shards of its index."""
    single, index = os.path.join(ckpt_dir, SAFE_WEIGHTS_NAME), os.path.join(ckpt_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"Cannot resume: {index} is corrupt or truncated ({exc}).") from exc
        return {name: os.path.join(ckpt_dir, shard) for name, shard in weight_map.items()}
    raise FileNotFoundError(f"Cannot resume: {single} is missing (not an HD-PiSSA checkpoint?).")


class _open_safetensors:
    """``safe_open`` whose failures name the file and say it is damaged."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Cannot resume: {self.path} is missing (not an HD-PiSSA checkpoint?).")
        try:
            self._cm = safe_open(self.path, "pt")
            return self._cm.__enter__()
        except Exception as exc:  # SafetensorError, OSError: safetensors names neither the file nor the cause
            raise ValueError(f"Cannot resume: {self.path} is corrupt or truncated ({exc}).") from exc

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _read_tensors(path: str, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_safetensors(path) as f:
        for name in f.keys() if names is None else names:
            try:
                yield name, f.get_tensor(name)
            except Exception as exc:
                raise ValueError(f"Cannot resume: {path} is corrupt or truncated ({exc}).") from exc


def load_hdpissa_checkpoint(engine: HDPiSSAEngine, ckpt_dir: str) -> None:
    """Restore W and the engine state from a checkpoint dir (single or sharded weights, read one shard at a time).

    Refuses, before W is touched, an incomplete checkpoint and one made with another K, model or configuration.
    """
    if not os.path.isfile(os.path.join(ckpt_dir, COMPLETE_MARKER)):
        raise ValueError(f"Checkpoint {ckpt_dir} is incomplete (no {COMPLETE_MARKER}): it was interrupted while "
                         f"being written. Resume from an earlier checkpoint.")
    state_path = os.path.join(ckpt_dir, HDPISSA_STATE_NAME)
    tensors = dict(_read_tensors(state_path))
    with _open_safetensors(state_path) as f:
        meta = f.metadata() or {}
    files = _weight_files(ckpt_dir)
    # The engine state first: it refuses another K, r, layer set or config (and restores the fp32 master; the W
    # saved in the model dtype is exactly that master's cast, so W below agrees with it).
    engine.load_state_dict({"tensors": tensors, "metadata": meta})
    params: dict[str, torch.Tensor] = {}
    for key, param in engine.model.state_dict(keep_vars=True).items():
        plain = plain_key(key)
        if plain is None:
            continue
        if plain not in files:
            if param.is_floating_point() and key.endswith("weight") and "lm_head" not in key:
                raise ValueError(f"Cannot resume: the checkpoint in {ckpt_dir} has no tensor {plain!r} (another "
                                 f"model?).")
            continue
        params[plain] = param
    by_file: dict[str, list[str]] = {}
    for plain in params:
        by_file.setdefault(files[plain], []).append(plain)
    with torch.no_grad():
        for path, names in by_file.items():
            for plain, src in _read_tensors(path, names):
                param = params[plain]
                if src.shape != param.shape:
                    raise ValueError(f"Cannot resume: {plain!r} has shape {tuple(src.shape)} in the checkpoint but "
                                     f"{tuple(param.shape)} in this model (another model?).")
                param.data.copy_(src.to(param.dtype))
    engine.check_consistency(engine.step, on_mismatch="raise")


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt_dir: str, rank: int) -> None:
    """Load this device's own optimizer state from a checkpoint."""
    path = os.path.join(ckpt_dir, optimizer_state_name(rank))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Cannot resume: {path} is missing (every device's optimizer state is needed).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle: torch names neither the file nor the cause
        raise ValueError(f"Cannot resume: {path} is corrupt or truncated ({type(exc).__name__}: {exc}).") from exc
    optimizer.load_state_dict(state)


# -- the Trainer side ---------------------------------------------------------------------------------------------

class CheckpointMixin:
    """``Trainer`` overrides for atomic, HD-PiSSA-aware checkpoints (mixed into :class:`HDPiSSATrainerMixin`).

    transformers has no public hook around writing or reading a checkpoint, so these are overrides of its private
    methods; each says why in one line (every private override of the trainers, and why no public hook does its job:
    docs/layout.md). With ``method="peft"`` (a user's own PEFT config) checkpoints are written and read by the parent
    unchanged; only the Hub push still keeps the token out of the pushed training arguments.
    """

    hdpissa_engine: HDPiSSAEngine | None = None
    _hdpissa_in_checkpoint = False
    _hdpissa_pending_push: str | None = None

    def _hdpissa_owns_checkpoints(self) -> bool:
        return getattr(self, "method", "peft") != "peft"

    @property
    def hdpissa_sharded(self) -> bool:
        """W sharded by rows (FSDP2): checkpoints go through torch.distributed.checkpoint
        (:mod:`hdpissa_trl.trainer.sharded_checkpoint`), one file per rank, and W is never gathered into them."""
        from ..engine.sharded import ShardedHDPiSSAEngine

        return isinstance(self.hdpissa_engine, ShardedHDPiSSAEngine)

    def _barrier(self) -> None:
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Before transformers looks for the checkpoint to resume from, put back one that a crash left under
        ``.old-checkpoint-N`` while it was being replaced (:func:`replace_directory`)."""
        if resume_from_checkpoint and self._hdpissa_owns_checkpoints():
            run_dir = (self.args.output_dir if resume_from_checkpoint is True
                       else os.path.dirname(os.path.abspath(os.fspath(resume_from_checkpoint))))
            restore_replaced_checkpoints(run_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # Overridden: no public hook wraps a whole checkpoint save; this makes it atomic (temp dir, marker, rename).
    def _save_checkpoint(self, model, trial) -> None:
        if not self._hdpissa_owns_checkpoints():
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp_parent, final = os.path.join(run_dir, f".tmp-{name}"), os.path.join(run_dir, name)
        if self.args.should_save:
            remove_stale_temp_checkpoints(run_dir)
        self._barrier()
        real_output_dir = self.args.output_dir
        self._hdpissa_in_checkpoint, self._hdpissa_pending_push = True, None
        try:
            self.args.output_dir = tmp_parent
            super()._save_checkpoint(model, trial)
            tmp = os.path.join(self._get_output_dir(trial=trial), name)
            self._save_hdpissa_state(tmp)
        finally:
            self.args.output_dir = real_output_dir
            self._hdpissa_in_checkpoint = False
        self._record_best_checkpoint(run_dir, tmp)
        self._barrier()
        self._confirm_checkpoint_files(tmp, final)  # every rank, before anything is marked, published or rotated
        if self.args.should_save:
            mark_complete(tmp, {"global_step": self.state.global_step, "world_size": self.accelerator.num_processes,
                                "method": self.method})
            publish(tmp, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            if self._hdpissa_pending_push is not None:
                self._push_from_checkpoint(final)
        self._hdpissa_pending_push = None
        self._barrier()

    def _record_best_checkpoint(self, run_dir: str, tmp: str) -> None:
        """transformers looks for the best checkpoint next to the one being written, i.e. in the temp dir here; record
        its final path instead (and rewrite ``trainer_state.json``), so best-model loading and rotation find it."""
        step = self.state.best_global_step
        if not step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
        if self.args.should_save:
            self.state.save_to_json(os.path.join(tmp, TRAINER_STATE_NAME))

    def _confirm_checkpoint_files(self, tmp: str, final: str) -> None:
        """Collective: every rank must see, in the checkpoint being written, the files its node's saving rank wrote
        (``trainer_state.json``; the engine state) and its own (its optimizer state), or the checkpoint its node
        publishes could not resume this rank (retried for ``FILES_VISIBLE_WAIT_S``: shared storage may show a file
        late). If one rank does not, every rank raises BEFORE anything is marked complete, published or rotated (the
        last good checkpoint stays). With W sharded every rank's DCP files were confirmed the same way as they were
        written (``sharded_checkpoint.save_sharded_checkpoint``)."""
        needed = [TRAINER_STATE_NAME]
        if self.hdpissa_sharded:
            from .sharded_checkpoint import META_NAME

            needed.append(META_NAME)
        elif self.hdpissa_engine is not None:
            needed += [HDPISSA_STATE_NAME, optimizer_state_name(self.accelerator.process_index)]

        def missing() -> list[str]:
            return [name for name in needed if not os.path.isfile(os.path.join(tmp, name))]

        def blind_ranks(flag: bool) -> list[int]:
            if self.accelerator.num_processes == 1:
                return [0] if flag else []
            flags = self.accelerator.gather(torch.tensor([int(flag)], device=self.accelerator.device))
            return [k for k, f in enumerate(flags.tolist()) if f]

        blind, missing = wait_until_everyone_sees(missing, blind_ranks)
        if not blind:
            return
        me = self.accelerator.process_index
        raise RuntimeError(
            f"Checkpoint {final} was not published: rank(s) {blind} cannot see the files the saving rank wrote into "
            f"{tmp}" + (f" (rank {me} misses {', '.join(missing)})" if missing else "") + ": output_dir is not on a "
            "filesystem that all nodes share. Set save_on_each_node=True (each node keeps its own complete copy) or "
            "put output_dir on a shared filesystem. Earlier checkpoints were left as they were."
        )

    def _save_hdpissa_state(self, ckpt_dir: str) -> None:
        """Every rank writes its optimizer state; the saving rank writes the engine state once (per node)."""
        os.makedirs(ckpt_dir, exist_ok=True)
        if self.hdpissa_engine is None:
            return
        if self.hdpissa_sharded:
            from .sharded_checkpoint import save_sharded_checkpoint

            save_sharded_checkpoint(ckpt_dir, self.hdpissa_engine, self.optimizer, atomic=False)
            return
        save_optimizer_state(self.optimizer, ckpt_dir, self.accelerator.process_index)
        if self.args.should_save:
            save_engine_state(self.hdpissa_engine, ckpt_dir)

    # Overridden: transformers pushes from inside _save_checkpoint, i.e. from the temp dir about to be renamed (the
    # asynchronous upload would race that); the push is deferred to the end of the save, with the token kept out of
    # the pushed training_args.bin.
    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        from .hub import hub_token_outside_args

        if self._hdpissa_in_checkpoint:
            self._hdpissa_pending_push = checkpoint_folder
            return
        with hub_token_outside_args(self):
            super()._push_from_checkpoint(checkpoint_folder)

    # Overridden: with W sharded the optimizer states go into the checkpoint's DCP files (one key per device), not
    # through transformers' (FSDP) optimizer saving; the scheduler is written as usual.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.hdpissa_sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            from transformers.trainer import SCHEDULER_NAME

            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_hdpissa_weights(self, ckpt_dir: str) -> None:
        if self.hdpissa_sharded:
            from .sharded_checkpoint import load_sharded_checkpoint

            load_sharded_checkpoint(ckpt_dir, self.hdpissa_engine)
        else:
            load_hdpissa_checkpoint(self.hdpissa_engine, ckpt_dir)

    # Overridden: the checkpoint has plain keys (W of adapted layers goes into `base_layer`) and the engine state.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.hdpissa_engine is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self._load_hdpissa_weights(resume_from_checkpoint)
        self._load_hdpissa_extra_state(resume_from_checkpoint)

    def _load_hdpissa_extra_state(self, ckpt_dir: str) -> None:
        """Training state beyond the weights, restored right after them on resume (whatever the method). No-op here;
        the DPO / GRPO trainers restore their synced reference model here (``ReferenceTrainerMixin``), the
        counterpart of what they add to :meth:`_save_hdpissa_state`."""

    # Overridden for load_best_model_at_end, for the same reason: W (and its fp32 master) restored exactly.
    def _load_best_model(self) -> None:
        if self.hdpissa_engine is None:
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_hdpissa_weights(self.state.best_model_checkpoint)

    # Overridden: every device has its own optimizer state; transformers restores rank 0's on all of them.
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.hdpissa_sharded:
            from transformers.trainer import SCHEDULER_NAME

            from .sharded_checkpoint import load_sharded_optimizer

            load_sharded_optimizer(checkpoint, self.hdpissa_engine, self.optimizer)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            return
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.hdpissa_engine is not None:
            load_optimizer_state(self.optimizer, checkpoint, self.accelerator.process_index)

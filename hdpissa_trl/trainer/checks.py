"""Refusals shared by TRL's DPO and GRPO trainers: the output head (their loss reads its weight directly) and W
sharded by rows (their reference model and generation have not been run with a sharded policy)."""

from __future__ import annotations

from ..engine.config import HDPiSSAConfig
from ..engine.model import find_target_modules


def refuse_adapted_output_head(model, config: HDPiSSAConfig, trainer_name: str) -> None:
    """TRL computes log-probabilities from ``lm_head.weight`` directly (fused LM head): an adapter on the head would
    never get a gradient. Refuse it before any work, as TRL does for PEFT."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    hit = [name for name, mod in find_target_modules(model, config) if mod is head]
    if hit:
        raise ValueError(f"Adapting the output head {hit[0]!r} is not supported with {trainer_name}: it computes "
                         f"log-probabilities from its weight directly (fused LM head), so the adapter would never "
                         f"be trained. Remove it from target_modules (or use 'all-linear', which leaves it out).")


def refuse_sharded_w(trainer, trainer_name: str) -> None:
    """W sharded by rows (FSDP2) is built and tested for the SFT trainer and the engine; with DPO/GRPO the reference
    model, the reference sync and generation would each meet a sharded policy, and none of that has run yet. Refuse
    it clearly rather than train something unverified."""
    from .fsdp import requested_fsdp_plugin

    if requested_fsdp_plugin(trainer.args, trainer.accelerator) is not None:
        raise ValueError(f"HD-PiSSA with {trainer_name} supports replicated W only (a DDP-style launch such as "
                         f"recipes/accelerate_configs/cpu.yaml or multi_gpu.yaml), not W sharded by rows with FSDP2 "
                         f"(the fsdp2 / cpu_fsdp2 configs): that combination is not tested yet. Use FSDP2 with "
                         f"HDPiSSASFTTrainer, or launch {trainer_name} without FSDP.")

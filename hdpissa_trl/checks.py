"""Refusals shared by the trainers whose loss reads the output head's weight directly (TRL's DPO and GRPO)."""

from __future__ import annotations

from .config import HDPiSSAConfig
from .model import find_target_modules


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

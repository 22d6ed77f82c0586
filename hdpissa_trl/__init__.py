"""hdpissa_trl: HD-PiSSA (High-rank Distributed PiSSA) for Hugging Face TRL.

Engine (no ``transformers.Trainer`` inside, importable without ``trl``): :class:`HDPiSSAConfig`,
:func:`inject_hdpissa` / :class:`HDPiSSAEngine`, :class:`HDPiSSALinear`, :func:`fold_deltas`. Trainer (imported on
first use, it needs ``trl``): :class:`HDPiSSASFTTrainer`, :class:`HDPiSSADPOTrainer`, :class:`HDPiSSAGRPOTrainer`,
:class:`HDPiSSATrainer` (plain ``transformers.Trainer``) and the reusable :class:`HDPiSSATrainerMixin`. W sharded
by rows with FSDP2: :func:`shard_model`, then :func:`inject_hdpissa` gives a :class:`ShardedHDPiSSAEngine`;
:func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` (``docs/parallelism.md``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .engine import (
    FoldStats,
    HDPiSSAConfig,
    HDPiSSAEngine,
    HDPiSSALinear,
    ShardedHDPiSSAEngine,
    WeightMismatchError,
    WeightUpdater,
    distributed_init_factors,
    find_target_modules,
    fold_deltas,
    inject_hdpissa,
    shard_model,
    shutdown_distributed,
    stochastic_round_to_bf16,
    top_singular_factors,
    weight_checksums,
)

__version__ = "0.1.0"

# Public names whose module imports trl (or torch.distributed's DTensor / checkpoint machinery, for W sharded by
# rows): loaded on first attribute access (PEP 562), so engine-only use stays light.
_LAZY = {
    "HDPiSSASFTTrainer": "trainer",
    "HDPiSSATrainerMixin": "trainer",
    "build_peft_config": "trainer",
    "load_hdpissa_checkpoint": "checkpoint",
    "HDPiSSADPOTrainer": "dpo",
    "HDPiSSAGRPOTrainer": "grpo",
    "HDPiSSATrainer": "plain_trainer",
    "load_sharded_checkpoint": "sharded_checkpoint",
    "save_sharded_checkpoint": "sharded_checkpoint",
}

if TYPE_CHECKING:
    from .checkpoint import load_hdpissa_checkpoint
    from .dpo import HDPiSSADPOTrainer
    from .grpo import HDPiSSAGRPOTrainer
    from .plain_trainer import HDPiSSATrainer
    from .sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
    from .trainer import HDPiSSASFTTrainer, HDPiSSATrainerMixin, build_peft_config

__all__ = [
    "FoldStats",
    "HDPiSSAConfig",
    "HDPiSSADPOTrainer",
    "HDPiSSAEngine",
    "HDPiSSAGRPOTrainer",
    "HDPiSSALinear",
    "HDPiSSASFTTrainer",
    "HDPiSSATrainer",
    "HDPiSSATrainerMixin",
    "ShardedHDPiSSAEngine",
    "WeightMismatchError",
    "WeightUpdater",
    "build_peft_config",
    "distributed_init_factors",
    "find_target_modules",
    "fold_deltas",
    "inject_hdpissa",
    "load_hdpissa_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_model",
    "shutdown_distributed",
    "stochastic_round_to_bf16",
    "top_singular_factors",
    "weight_checksums",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""hdpissa_trl: HD-PiSSA (High-rank Distributed PiSSA) for Hugging Face TRL.

Three layers, each importing only the ones before it (``docs/layout.md``):

* :mod:`hdpissa_trl.engine`: the method (no ``transformers.Trainer`` inside, importable without ``trl``):
  :class:`HDPiSSAConfig`, :func:`inject_hdpissa` / :class:`HDPiSSAEngine`, :class:`HDPiSSALinear`,
  :func:`fold_deltas`; W sharded by rows with FSDP2: :func:`shard_model`, then :func:`inject_hdpissa` gives a
  :class:`ShardedHDPiSSAEngine`.
* :mod:`hdpissa_trl.trainer`: the TRL / transformers integration (imported on first use):
  :class:`HDPiSSASFTTrainer`, :class:`HDPiSSADPOTrainer`, :class:`HDPiSSAGRPOTrainer`, :class:`HDPiSSATrainer`
  (plain ``transformers.Trainer``) and the reusable :class:`HDPiSSATrainerMixin`; checkpoints, including
  :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` (``docs/parallelism.md``).
* :mod:`hdpissa_trl.scripts`: what the recipe scripts need beyond TRL (arguments, run steps, data mixtures, GGUF).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .engine import (
    FactoredUpdate,
    FoldStats,
    HDPiSSAConfig,
    HDPiSSAEngine,
    HDPiSSALinear,
    ShardedHDPiSSAEngine,
    WeightMismatchError,
    WeightUpdater,
    distributed_init_factors,
    export_updates,
    factor_update,
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

# Public names of the trainer package (it imports transformers' Trainer, and trl for TRL's trainers; the sharded
# checkpoints import torch.distributed.checkpoint): loaded on first attribute access (PEP 562), so engine-only use
# stays light.
_LAZY = {
    "AdapterExport": "trainer.adapter",
    "HDPiSSASFTTrainer": "trainer.sft_trainer",
    "HDPiSSATrainerMixin": "trainer.mixin",
    "build_peft_config": "trainer.mixin",
    "load_hdpissa_checkpoint": "trainer.checkpoint",
    "HDPiSSADPOTrainer": "trainer.dpo_trainer",
    "HDPiSSAGRPOTrainer": "trainer.grpo_trainer",
    "HDPiSSATrainer": "trainer.plain_trainer",
    "load_sharded_checkpoint": "trainer.sharded_checkpoint",
    "save_sharded_checkpoint": "trainer.sharded_checkpoint",
}

if TYPE_CHECKING:
    from .trainer.adapter import AdapterExport
    from .trainer.checkpoint import load_hdpissa_checkpoint
    from .trainer.dpo_trainer import HDPiSSADPOTrainer
    from .trainer.grpo_trainer import HDPiSSAGRPOTrainer
    from .trainer.mixin import HDPiSSATrainerMixin, build_peft_config
    from .trainer.plain_trainer import HDPiSSATrainer
    from .trainer.sft_trainer import HDPiSSASFTTrainer
    from .trainer.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

__all__ = [
    "AdapterExport",
    "FactoredUpdate",
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
    "export_updates",
    "factor_update",
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

"""The one entry point that turns a model into an HD-PiSSA model: it picks the engine the model's weights call for.

Both engines live below it: :class:`~hdpissa_trl.engine.model.HDPiSSAEngine` (W replicated on every device) and
:class:`~hdpissa_trl.engine.sharded.ShardedHDPiSSAEngine` (W sharded by rows with FSDP2), which builds on the first.
"""

from __future__ import annotations

from torch import nn

from .config import HDPiSSAConfig
from .model import HDPiSSAEngine
from .sharded import ShardedHDPiSSAEngine


def inject_hdpissa(model: nn.Module, config: HDPiSSAConfig, rank: int | None = None, world_size: int | None = None,
                   group=None, show_progress: bool = True) -> HDPiSSAEngine:
    """Turn ``model`` into an HD-PiSSA model for device ``rank`` of ``world_size`` (in place); returns the engine.

    The engine is also attached as ``model.hdpissa_engine``. A model already sharded with FSDP2 (DTensor weights,
    ``fully_shard``) gets the :class:`~hdpissa_trl.engine.sharded.ShardedHDPiSSAEngine`: each rank folds only its
    rows of W.
    """
    from torch.distributed.tensor import DTensor

    engine_cls = HDPiSSAEngine
    if any(isinstance(p, DTensor) for p in model.parameters()):
        engine_cls = ShardedHDPiSSAEngine
    engine = engine_cls(model, config, rank, world_size, group, show_progress)
    model.hdpissa_engine = engine  # type: ignore[attr-defined]
    return engine

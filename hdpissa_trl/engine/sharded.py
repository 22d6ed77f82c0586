"""HD-PiSSA on weights sharded by rows with FSDP2: each rank holds, and folds, only its rows of ``W``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores a weight as a DTensor sharded by rows (``Shard(0)``): rank ``j``
of ``K`` holds the rows ``rows_j`` of ``W`` (``weight.to_local()``, ``torch.chunk`` layout). The method maps onto it:

* The model is sharded first, then HD-PiSSA is injected: the adapters ``(A_j, B_j)`` are plain per-rank tensors that
  FSDP never manages, so they never pass through its gradient reduce-scatter nor its parameter broadcast (the two
  traps of DESIGN §3). Inside the forward FSDP has already gathered ``W``, so the layer computes as usual.
* Every rank keeps all ``A0_k`` (``K·r × n``: any row of the fold needs them), but of ``B0`` only its own slice
  ``B0_j`` (``m × r``, the reset value of its adapter) and its rows of everybody's, ``B0_all[rows_j]``.
* The fold updates only this rank's rows, in the configured precision mode (the fp32 master or the Kahan
  compensation is allocated for those rows only)::

      W[rows_j] += s · Σ_k (dB_k[rows_j] · A_k + B0_k[rows_j] · dA_k)

  1/K of the replicated engine's fold compute and of W's memory per rank.
* Communication, two schemes (:data:`COMM_SCHEMES`): the replicated engine's one all-gather of every ``(dA_k, dB_k)``
  (each rank receives ``(K−1)·r·(m+n)`` values per layer), or an all-gather of the A-side plus an all-to-all that
  delivers each rank only its rows of every ``dB_k`` (``(K−1)·r·(n + m/K)``). ``"auto"`` takes the one that moves
  fewer bytes.

The invariant is no longer "bit-identical replicas of W" (each row has exactly one owner), but: the full ``W``
gathered from the shards equals the replicated engine's. Every ``sync_check_steps`` folds the ranks compare what can
be compared: the replicated ``A0_all``, every device's ``B0`` against its rows on the other ranks, and the rows each
rank's fold writes against ``W`` as FSDP2 gathers it for the forward.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn

from .config import SHARDED_COMM as COMM_SCHEMES
from .consistency import WeightMismatchError, tensor_checksum
from .distributed import collective_errors
from .fold import FoldStats, Stopwatch, buckets_by_size, gather_buffers, local_delta_buffer, update_rank_bound
from .init import top_singular_factors
from .layer import HDPiSSALinear, plain_key
from .model import FACTOR_CONVENTION, HDPiSSAEngine, WeightCheck, _set_submodule, find_target_modules
from .precision import WeightUpdater


# -- where the rows are --------------------------------------------------------------------------------------------
def is_row_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor sharded by rows over a 1-D mesh (what ``fully_shard`` makes of a weight)."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(tensor, DTensor) and tuple(tensor.placements) == (Shard(0),)


def shard_rows(m: int, world: int) -> list[tuple[int, int]]:
    """Global ``[start, stop)`` rows of every rank's shard, in FSDP2's ``torch.chunk`` layout (trailing ranks may be
    empty: 6 rows on 4 ranks are 2, 2, 2, 0)."""
    chunk = -(-m // world) if m else 0
    return [(min(j * chunk, m), min((j + 1) * chunk, m)) for j in range(world)]


def shard_group(weight: torch.Tensor):
    """``(process_group, K, j)`` of the mesh a row-sharded weight lives on; refuses 2-D meshes (HSDP)."""
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"HD-PiSSA supports FSDP2 weights sharded over a 1-D device mesh; got a {mesh.ndim}-D mesh "
                         f"{tuple(mesh.mesh_dim_names or ())}. HSDP (replicate + shard) is not supported: shard over "
                         f"all devices.")
    return mesh.get_group(), mesh.size(), mesh.get_local_rank()


def _padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    """``local`` with zero rows appended up to ``rows`` (collectives need equal sizes)."""
    if local.shape[0] == rows:
        return local.contiguous()
    out = local.new_zeros((rows, *local.shape[1:]))
    out[: local.shape[0]] = local
    return out


@torch.no_grad()
def gather_rows(local: torch.Tensor, m: int, dst: int, group=None) -> torch.Tensor | None:
    """Collective: reassemble a row-sharded ``m``-row tensor from every rank's ``local`` rows on rank ``dst`` of
    ``group`` only (returns ``None`` elsewhere). One full tensor is materialised, on one rank."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    chunk = -(-m // world)
    send = _padded(local, chunk)
    # The parts are views of one buffer: no second full copy to concatenate them (the init's peak is one layer).
    full = send.new_empty((world * chunk, *send.shape[1:])) if me == dst else None
    dist.gather(send, list(full.chunk(world)) if full is not None else None, group_dst=dst, group=group)
    return full[:m] if full is not None else None


# -- the layer -----------------------------------------------------------------------------------------------------
class ShardedHDPiSSALinear(HDPiSSALinear):
    """:class:`HDPiSSALinear` whose base weight is an FSDP2 row shard.

    Buffers: ``A0_all`` (K·r × n, every slice, replicated), ``B0_rows`` (this rank's rows of every slice,
    ``B0_all[rows_j]``, m_j × K·r) and ``B0_own`` (this device's own slice ``B0_j``, m × r). ``rows`` are this rank's
    global rows of ``W``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, rank: int, world_size: int, scale: float,
                 lora_dropout: float = 0.0, name: str = ""):
        super().__init__(base_layer, r, rank, world_size, scale, lora_dropout, name)
        m = base_layer.out_features
        self.rows = shard_rows(m, world_size)[rank]
        local = base_layer.weight.to_local()
        if local.shape[0] != self.rows[1] - self.rows[0]:
            raise ValueError(f"Layer {name!r}: this rank holds {local.shape[0]} rows of W, but FSDP2's row layout "
                             f"says rows {self.rows}. Only the default Shard(0) placement is supported.")
        del self.B0_all  # the replicated engine's (m × K·r) buffer: here only this rank's rows are kept
        self.register_buffer("B0_rows", torch.zeros(self.rows[1] - self.rows[0], world_size * r,
                                                     dtype=torch.float32, device=local.device))
        self.register_buffer("B0_own", torch.zeros(m, r, dtype=torch.float32, device=local.device))

    @property
    def B0(self) -> torch.Tensor:
        return self.B0_own

    @torch.no_grad()
    def set_initial_factors(self, A0_all: torch.Tensor, B0_rows: torch.Tensor, B0_own: torch.Tensor) -> None:
        """Install every slice's ``A0``, this rank's rows of every ``B0`` and its own ``B0_j``; reset the adapter."""
        self.A0_all.copy_(A0_all)
        self.B0_rows.copy_(B0_rows)
        self.B0_own.copy_(B0_own)
        self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_row_sharded(self.base_layer.weight):
            raise RuntimeError(
                f"Layer {self.name!r} ran with its weight still sharded: FSDP2 gathers W in the forward of the "
                f"fully_shard-ed module that CONTAINS this layer. Shard the transformer blocks (accelerate: "
                f"fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP), not the adapted linear layers themselves, and call "
                f"the model, not the layer."
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rows={self.rows[0]}:{self.rows[1]}"


# -- init ----------------------------------------------------------------------------------------------------------
def _rounds(owners: list[int]) -> list[list[int]]:
    """Split layer indices into consecutive rounds in which no rank owns two layers (one full layer per rank)."""
    rounds, cur, seen = [], [], set()
    for i, owner in enumerate(owners):
        if owner in seen:
            rounds.append(cur)
            cur, seen = [], set()
        cur.append(i)
        seen.add(owner)
    if cur:
        rounds.append(cur)
    return rounds


def seed_offsets(ranks: list[int]) -> list[int]:
    """Per layer, the offset added to ``config.seed`` for its randomized SVD: the replicated engine's
    (:func:`~hdpissa_trl.engine.init.init_factors_per_layer` factors the layers of each rank together, layer ``i``
    being the ``t``-th of its rank gets ``seed + t``), so both engines start from the same factors with fitted ranks."""
    seen: dict[int, int] = {}
    out = []
    for r in ranks:
        out.append(seen.get(r, 0))
        seen[r] = out[-1] + 1
    return out


@torch.no_grad()
def sharded_init_factors(weights: list[torch.Tensor], ranks: list[int], method: str, n_iter: int, seed: int,
                         shard: bool, show_progress: bool = False,
                         scales: list[float] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Factor row-sharded weights without materialising more than one full layer per rank.

    Layer ``i`` (per-device rank ``ranks[i]``, scale ``scales[i] = lora_alpha / ranks[i]``) is owned by rank
    ``i mod K`` (``shard=True``) or rank 0. In each round every owner gathers ONE layer from the shards, factors it
    (top ``K·r`` directions, :func:`top_singular_factors`, the replicated engine's seeds: :func:`seed_offsets`),
    broadcasts ``A0_all`` and scatters to every rank ``j`` its rows of ``B0_all`` and its own slice ``B0_j``. Returns
    ``(A0_all, B0_rows, B0_own)`` per layer. Collective: every rank calls it with the same weights.
    """
    group, world, me = shard_group(weights[0])
    scales = scales or [1.0] * len(weights)
    owners = [(i % world) if shard else 0 for i in range(len(weights))]
    seeds = seed_offsets(ranks)
    rounds = _rounds(owners)
    if show_progress and me == 0:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="HD-PiSSA SVD init (sharded)")
    out: list = [None] * len(weights)
    for batch in rounds:
        # 1. Each owner gathers its one layer and factors it (the owners of a round work in parallel).
        mine = None
        for i in batch:
            full = gather_rows(weights[i].to_local(), weights[i].shape[0], owners[i], group)
            if full is not None:
                mine = (i, full)
        factors = None
        if mine is not None:
            i, full = mine
            factors = top_singular_factors(full, world * ranks[i], method, n_iter, seed + seeds[i], scales[i])
            del full
        # 2. The owner broadcasts A0_all and scatters the B0 pieces: rank j gets B0_all[rows_j] and B0_all[:, j-slice].
        for i in batch:
            (m, n), r = weights[i].shape, ranks[i]
            k = world * r
            dev = weights[i].to_local().device
            rows = shard_rows(m, world)
            chunk = -(-m // world)
            A0_all = factors[0] if owners[i] == me else torch.empty(k, n, dtype=torch.float32, device=dev)
            recv = torch.empty(chunk * k + m * r, dtype=torch.float32, device=dev)
            pieces = None
            if owners[i] == me:
                B0_all = factors[1]
                pieces = [torch.cat([_padded(B0_all[a:b], chunk).reshape(-1), B0_all[:, j * r:(j + 1) * r].reshape(-1)])
                          for j, (a, b) in enumerate(rows)]
            with collective_errors("sharded SVD init (broadcast/scatter of the factors)", 0, group):
                dist.broadcast(A0_all, group_src=owners[i], group=group)
                dist.scatter(recv, pieces, group_src=owners[i], group=group)
            a, b = rows[me]
            out[i] = (A0_all, recv[: chunk * k].view(chunk, k)[: b - a].clone(), recv[chunk * k:].view(m, r).clone())
    return out


# -- the fold ------------------------------------------------------------------------------------------------------
def comm_bytes(layers: list[ShardedHDPiSSALinear], world: int, rank: int) -> dict[str, dict[str, int]]:
    """fp32 bytes this rank sends and receives per fold under each scheme (what :func:`fold_sharded` moves)."""
    if world == 1:
        return {s: {"sent": 0, "received": 0} for s in COMM_SCHEMES[1:]}
    a_side = sum(lyr.r * lyr.in_features for lyr in layers)
    b_side = sum(lyr.r * lyr.out_features for lyr in layers)
    my_rows = sum(lyr.r * (lyr.rows[1] - lyr.rows[0]) for lyr in layers)
    return {
        "all_gather": {"sent": 4 * (a_side + b_side), "received": 4 * (world - 1) * (a_side + b_side)},
        "all_to_all": {"sent": 4 * (a_side + b_side - my_rows), "received": 4 * (world - 1) * (a_side + my_rows)},
    }


# What one bucket of the fold may receive when ``bucket_size_mb`` is 0: each rank receives K times what it sends, so an
# unbounded exchange is K times the adapters' deltas (23.8 GiB with all-to-all, 48.6 GiB with all-gather per rank for a
# Llama-3.1-70B shape at K = 64, r = 16: BENCHMARKS.md §7). 1 GiB buckets keep it bounded with large messages.
DEFAULT_RECEIVE_CAP_MB = 1024


def layer_receive_bytes(layer: ShardedHDPiSSALinear, world: int, scheme: str) -> int:
    """fp32 bytes of the receive buffer one layer takes in the fold's exchange (this rank's own part included: the
    collective's output holds all K). Rows are counted at the largest shard, ``ceil(m/K)``, so every rank gets the
    same number and cuts the same buckets."""
    a, m = layer.r * layer.in_features, layer.out_features
    b = layer.r * (m if scheme == "all_gather" else -(-m // world))
    return 4 * world * (a + b)


def receive_buckets(layers: list[ShardedHDPiSSALinear], world: int, scheme: str, cap_bytes: int) -> list[list[int]]:
    """Consecutive layer indices whose fold receive buffers together stay under ``cap_bytes`` (a layer larger than
    the cap alone); the same buckets on every rank. ``cap_bytes <= 0``: :data:`DEFAULT_RECEIVE_CAP_MB`."""
    cap = cap_bytes if cap_bytes > 0 else DEFAULT_RECEIVE_CAP_MB * 2**20
    return buckets_by_size([layer_receive_bytes(layer, world, scheme) for layer in layers], cap)


def choose_comm_scheme(scheme: str, layers: list[ShardedHDPiSSALinear], world: int, rank: int) -> str:
    """Resolve ``"auto"`` to the scheme that receives fewer bytes on this shape (the same answer on every rank)."""
    if scheme != "auto":
        return scheme
    # Every rank must pick the same scheme: decide on rank 0's view (rows differ by at most one per layer).
    costs = comm_bytes(layers, world, 0)
    return min(("all_gather", "all_to_all"), key=lambda s: costs[s]["received"])


@torch.no_grad()
def _own_rows_delta_buffers(layers: list[ShardedHDPiSSALinear], world: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int]]:
    """This device's ``dA`` of every layer (flat), and its ``dB`` rows ordered by destination rank, with the split."""
    d_a = torch.cat([(lyr.lora_A - lyr.A0).reshape(-1) for lyr in layers])
    d_b = [lyr.lora_B - lyr.B0 for lyr in layers]
    parts, splits = [], []
    for j in range(world):
        chunk = [d[a:b].reshape(-1) for d, lyr in zip(d_b, layers) for a, b in [shard_rows(lyr.out_features, world)[j]]]
        parts += chunk
        splits.append(sum(c.numel() for c in chunk))
    return d_a, torch.cat(parts), splits


def fold_target(layer: ShardedHDPiSSALinear) -> torch.Tensor:
    """The tensor the fold writes this rank's rows of ``W`` into (the consistency check compares it with the rows
    FSDP2 gathers for the forward)."""
    return layer.base_layer.weight.to_local()


@torch.no_grad()
def fold_rows(layer: ShardedHDPiSSALinear, dA_all: torch.Tensor, dB_rows: torch.Tensor, updater: WeightUpdater,
              step: int) -> None:
    """``W[rows_j] += s·[dB_all[rows_j] | B0_all[rows_j]] @ [A_all ; dA_all]`` on this rank's rows; reset adapter."""
    weight = fold_target(layer)
    if weight.shape[0]:
        left = torch.cat([dB_rows, layer.B0_rows], dim=1)  # (m_j, 2Kr)
        right = torch.cat([layer.A0_all + dA_all, dA_all], dim=0)  # (2Kr, n)
        updater.addmm(weight, left, right, layer.scale, step)
    layer.reset_adapter()


def fold_sharded(layers: list[ShardedHDPiSSALinear], updaters: list[WeightUpdater], step: int, group=None,
                 scheme: str = "auto", bucket_bytes: int = 0) -> FoldStats:
    """Exchange every device's adapter deltas and fold each rank's rows of every layer.

    ``scheme="all_gather"``: one all-gather of every ``(dA_k, dB_k)`` per bucket (as the replicated engine).
    ``"all_to_all"``: an all-gather of the ``dA_k`` plus an all-to-all of the ``dB_k`` rows, so each rank receives
    only its rows of the B-side. ``bucket_bytes`` caps what one bucket RECEIVES (K times what it sends; 0: 1 GiB,
    :data:`DEFAULT_RECEIVE_CAP_MB`). Collective: every rank calls it after the same optimizer step, same layers and
    order.
    """
    device = layers[0].A0_all.device if layers else None
    stats = FoldStats(fold_timer=Stopwatch(device))
    world, me = dist.get_world_size(group), dist.get_rank(group)
    scheme = choose_comm_scheme(scheme, layers, world, me)
    for bucket in receive_buckets(layers, world, "all_gather" if world == 1 else scheme, bucket_bytes):
        blayers = [layers[i] for i in bucket]
        timer = Stopwatch(device)
        if scheme == "all_gather" or world == 1:
            local = local_delta_buffer(blayers)
            gathered, ncoll = gather_buffers(local, group, step)
            stats.bytes_sent += local.nbytes if ncoll else 0
            stats.bytes_received += (world - 1) * local.nbytes
            a_parts, b_rows, offset = [], [], 0
            for lyr in blayers:
                na, nb = lyr.r * lyr.in_features, lyr.r * lyr.out_features
                a_parts.append(gathered[:, offset:offset + na])
                a, b = lyr.rows
                b_rows.append(gathered[:, offset + na:offset + na + nb].reshape(world, -1, lyr.r)[:, a:b])
                offset += na + nb
        else:
            d_a, d_b, splits = _own_rows_delta_buffers(blayers, world)
            gathered_a, ncoll = gather_buffers(d_a, group, step)
            mine = splits[me]
            recv = torch.empty(world * mine, dtype=d_b.dtype, device=d_b.device)
            with collective_errors("fold (all-to-all of the B-side rows)", step, group):
                dist.all_to_all_single(recv, d_b, output_split_sizes=[mine] * world, input_split_sizes=splits,
                                       group=group)
            ncoll += 1
            stats.bytes_sent += d_a.nbytes + 4 * (sum(splits) - mine)
            stats.bytes_received += (world - 1) * (d_a.nbytes + 4 * mine)
            recv = recv.view(world, mine)
            a_parts, b_rows, offset_a, offset_b = [], [], 0, 0
            for lyr in blayers:
                na, rows = lyr.r * lyr.in_features, lyr.rows[1] - lyr.rows[0]
                a_parts.append(gathered_a[:, offset_a:offset_a + na])
                b_rows.append(recv[:, offset_b:offset_b + rows * lyr.r].reshape(world, rows, lyr.r))
                offset_a += na
                offset_b += rows * lyr.r
        stats.gather_timers.append(timer.stop())
        stats.num_collectives += ncoll
        for i, lyr, a_part, b_part in zip(bucket, blayers, a_parts, b_rows):
            dA_all = a_part.reshape(world * lyr.r, lyr.in_features)  # rows k·r..(k+1)·r = dA_k
            dB_rows = b_part.permute(1, 0, 2).reshape(b_part.shape[1], world * lyr.r)  # columns k-major, like B0_rows
            fold_rows(lyr, dA_all, dB_rows, updaters[i], step)
    stats.update_rank_bound = update_rank_bound(layers, world)
    stats.fold_timer.stop()
    return stats


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP2 module back to its sharded state: after a forward without backward (evaluation) a module with
    ``reshard_after_forward=False`` still holds a gathered copy of W that a fold of the shards would not reach."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# -- the engine ----------------------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    """A module path as the model's state dict spells it: without the wrappers activation checkpointing and
    ``torch.compile`` insert (``_checkpoint_wrapped_module``, ``_orig_mod``), so checkpoints and merged keys do not
    depend on them."""
    return ".".join(part for part in name.split(".") if part not in ("_checkpoint_wrapped_module", "_orig_mod"))


def _row_dtensor(local: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """View this rank's rows ``local`` as the row-sharded DTensor of the full ``shape`` (same mesh as ``like``)."""
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


class ShardedHDPiSSAEngine(HDPiSSAEngine):
    """:class:`HDPiSSAEngine` for a model whose adapted weights FSDP2 has sharded by rows (see the module docstring).

    Build it with :func:`inject_hdpissa` AFTER ``fully_shard`` (or :func:`shard_model`): it detects the DTensor
    weights. ``names`` are the layers' state-dict names (:func:`canonical_name`). Differences from the replicated
    engine: the fold updates this rank's rows only; :meth:`state_dict` holds DTensors for
    ``torch.distributed.checkpoint`` (the trainer's :mod:`hdpissa_trl.trainer.sharded_checkpoint` writes them);
    :meth:`merged_state_dict` gathers the full model on rank 0 only; the consistency check compares ``A0_all``,
    ``B0`` and the rows of ``W`` each fold writes with what the forward gathers (:meth:`check_consistency`).
    """

    layers: list[ShardedHDPiSSALinear]

    def __init__(self, model: nn.Module, config, rank: int | None = None, world_size: int | None = None,
                 group=None, show_progress: bool = True):
        if config.subspace != "fixed":
            raise ValueError(f"HDPiSSAConfig.subspace={config.subspace!r} is not available with W sharded by rows "
                             f"(FSDP2) yet: use subspace='fixed', or the replicated engine (a DDP launch).")
        if config.slice_gradient != "local":
            raise ValueError(f"HDPiSSAConfig.slice_gradient={config.slice_gradient!r} is not available with W sharded "
                             f"by rows (FSDP2): use slice_gradient='local', or the replicated engine (a DDP launch).")
        if group is None:
            targets = find_target_modules(model, config)
            sharded = [mod.weight for _, mod in targets if is_row_sharded(mod.weight)]
            group = shard_group(sharded[0])[0] if sharded else None
        super().__init__(model, config, rank, world_size, group, show_progress)

    def _inject(self, targets: list[tuple[str, nn.Module]], ranks: list[int], show_progress: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        for name, module in targets:
            if isinstance(module, FSDPModule):
                raise ValueError(
                    f"Layer {name!r} is itself a fully_shard-ed module. Shard the transformer blocks that contain the "
                    f"adapted linear layers (accelerate: fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP, not "
                    f"SIZE_BASED_WRAP), so FSDP gathers W before the layer runs."
                )
            if getattr(module.weight, "device_mesh", None) is not None:
                shard_group(module.weight)  # refuses a 2-D (HSDP) mesh with its own message
            if not is_row_sharded(module.weight):
                raise ValueError(
                    f"Layer {name!r} has a {type(module.weight).__name__} weight, not an FSDP2 row shard, while other "
                    f"weights of this model are sharded. Shard the whole model (every transformer block and the root) "
                    f"before injecting HD-PiSSA."
                )
            _, K, j = shard_group(module.weight)
            if (K, j) != (self.world_size, self.rank):
                raise ValueError(f"Layer {name!r} is sharded over {K} ranks (this is shard {j}), but HD-PiSSA runs on "
                                 f"{self.world_size} devices (this is device {self.rank}): shard over all devices.")
        config, K = self.config, self.world_size
        scales = [config.lora_alpha / r for r in ranks]
        factors = sharded_init_factors([mod.weight for _, mod in targets], ranks, config.init_method, config.n_iter,
                                       config.seed, shard=config.shard_init, show_progress=show_progress,
                                       scales=scales)
        for i, ((name, module), r, s) in enumerate(zip(targets, ranks, scales)):
            layer = ShardedHDPiSSALinear(module, r, self.rank, K, s, config.lora_dropout, name=name)
            layer.set_initial_factors(*factors[i])
            factors[i] = None  # freed as each layer takes its copy: the factors are never held twice
            _set_submodule(self.model, name, layer)
            self.names.append(canonical_name(name))
            self.layers.append(layer)
            # Precision state (fp32 master, Kahan compensation) for this rank's rows only. Layer index i·K + j: the
            # stochastic-rounding bits of different row shards are drawn independently.
            self.updaters.append(WeightUpdater(module.weight.to_local(), config.precision, config.seed, i * K + self.rank,
                                              config.fold_matmul))

    # -- training ------------------------------------------------------------------------------------------------
    def fold(self) -> FoldStats:
        """Exchange every device's deltas, fold this rank's rows of every ``W``, reset adapters; every rank calls."""
        self.step += 1
        reshard_all(self.model)
        stats = fold_sharded(self.layers, self.updaters, self.step, group=self.group, scheme=self.config.sharded_comm,
                             bucket_bytes=int(self.config.bucket_size_mb * 2**20))
        if self.config.sync_check_steps and self.step % self.config.sync_check_steps == 0:
            self.check_consistency(self.step)
        return stats

    def comm_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes this rank sends/receives per fold under each communication scheme."""
        return comm_bytes(self.layers, self.world_size, self.rank)

    def checksums(self) -> torch.Tensor:
        """This rank's row of the consistency table (:meth:`check_consistency`): per layer the checksum of ``A0_all``,
        of ``B0_own`` restricted to every rank's rows, of every device's column block of ``B0_rows``, of the rows the
        fold writes and of every rank's block of ``W`` as FSDP2 gathers it for this rank's forward; then the fold
        counter. Collective (the gathered view of ``W`` is FSDP2's all-gather): every rank calls it."""
        if not self.layers:
            return torch.tensor([self.step], dtype=torch.int64)
        K = self.world_size
        table = torch.zeros(len(self.layers), 3 * K + 2, dtype=torch.int64)
        targets = [fold_target(layer) for layer in self.layers]  # taken while the weights are row shards
        for i, layer in enumerate(self.layers):
            r, rows = layer.r, shard_rows(layer.out_features, K)
            table[i, 0] = tensor_checksum(layer.A0_all).cpu()
            for j, (a, b) in enumerate(rows):
                table[i, 1 + j] = tensor_checksum(layer.B0_own[a:b]).cpu()
            for k in range(K):
                table[i, 1 + K + k] = tensor_checksum(layer.B0_rows[:, k * r:(k + 1) * r]).cpu()
        for module, members in self._fsdp_units():
            module.unshard()  # what the forward computes with: FSDP2's all-gather of every rank's shard
            try:
                for i in members:
                    layer = self.layers[i]
                    view = layer.base_layer.weight  # the unsharded parameter while the unit is unsharded
                    table[i, 2 * K + 1] = tensor_checksum(targets[i].to(view.dtype)).cpu()
                    for j, (a, b) in enumerate(shard_rows(layer.out_features, K)):
                        table[i, 2 * K + 2 + j] = tensor_checksum(view[a:b]).cpu()
            finally:
                module.reshard()
        return torch.cat([table.reshape(-1), torch.tensor([self.step], dtype=torch.int64)])

    def _fsdp_units(self) -> list[tuple[nn.Module, list[int]]]:
        """The ``fully_shard``-ed modules that hold adapted weights, with the indices of their layers, in model order
        (a weight belongs to the innermost such module above it)."""
        from torch.distributed.fsdp import FSDPModule

        named = list(self.model.named_modules())
        units = [(name, module) for name, module in named if isinstance(module, FSDPModule)]
        paths = {id(module): name for name, module in named}
        members: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            path = paths[id(layer)]
            owner = max((name for name, _ in units if not name or path.startswith(name + ".")), key=len)
            members.setdefault(owner, []).append(i)
        return [(module, members[name]) for name, module in units if name in members]

    def check_consistency(self, step: int | None = None, on_mismatch: str | None = None) -> list[str]:
        """Compare across ranks what must agree while each row of ``W`` has one owner (one all-gather of checksums):

        * ``A0_all``, replicated on every rank;
        * ``B0``: device ``k``'s own slice on rank ``k`` against its rows held by every rank ``j`` (``B0_rows``);
        * ``W``: the rows rank ``j``'s fold writes against rank ``j``'s block of ``W`` as FSDP2 gathers it for every
          rank's forward (a fold that does not reach the forward, e.g. a weight replaced after injection, is caught);
        * the fold counter.

        A mismatch of ``A0_all`` raises :class:`~hdpissa_trl.engine.consistency.WeightMismatchError` naming the layer
        (``"raise"``) or copies rank 0's (``"resync"``). The others always raise: each has one owner, so there is no
        copy to re-sync from. Costs one all-gather of ``W`` (a forward's worth of FSDP2 traffic) per check.
        """
        step = self.step if step is None else step
        on_mismatch = on_mismatch or self.config.on_sync_mismatch
        resynced: list[str] = []
        K = self.world_size
        if K > 1 and self.layers:
            local = self.checksums().to(self.layers[0].A0_all.device)
            table = torch.empty(K * local.numel(), dtype=torch.int64, device=local.device)
            with collective_errors("consistency check (all-gather of the checksums)", step, self.group):
                dist.all_gather_into_tensor(table, local, group=self.group)
            table = table.view(K, -1).cpu()
            steps, table = table[:, -1], table[:, :-1].view(K, len(self.layers), 3 * K + 2)
            self._raise_on_single_owner_mismatch(table, steps, step)
            bad = (table[:, :, 0] != table[0:1, :, 0]).any(dim=0).nonzero().flatten().tolist()
            if bad and on_mismatch == "raise":
                raise WeightMismatchError(
                    f"HD-PiSSA state mismatch at step {step}: the initial factors A0 of layer {self.names[bad[0]]!r} "
                    f"differ between ranks ({len(bad)} layer(s) in total). Every rank must hold the same A0_all; set "
                    f"on_sync_mismatch='resync' to copy rank 0's."
                )
            for i in bad:
                dist.broadcast(self.layers[i].A0_all, group_src=0, group=self.group)
                self.layers[i].reset_adapter()
                resynced.append(self.names[i])
        self.last_check = WeightCheck(step, not resynced, resynced)
        return resynced

    def _raise_on_single_owner_mismatch(self, table: torch.Tensor, steps: torch.Tensor, step: int) -> None:
        """The fold counter, ``B0`` and ``W`` checks of :meth:`check_consistency` on the gathered ``(K, L, 3K+2)``
        table; raises on the first mismatch, naming the layer, the rows and the ranks."""
        K, after = self.world_size, "Resume from the last checkpoint (each has one owner: nothing to re-sync from)."
        if (steps != steps[0]).any():
            raise WeightMismatchError(f"HD-PiSSA state mismatch at step {step}: the ranks have folded different numbers "
                                      f"of times ({steps.tolist()} per rank): a rank skipped or repeated a fold. {after}")
        for i, (name, layer) in enumerate(zip(self.names, self.layers)):
            rows = shard_rows(layer.out_features, K)
            for j, (a, b) in enumerate(rows):
                for k in range(K):
                    if table[k, i, 1 + j] != table[j, i, 1 + K + k]:
                        raise WeightMismatchError(
                            f"HD-PiSSA state mismatch at step {step}: layer {name!r}: rows {a}:{b} of device {k}'s "
                            f"initial factor B0 held by rank {j} differ from device {k}'s own B0. {after}")
                for viewer in range(K):
                    if table[viewer, i, 2 * K + 2 + j] != table[j, i, 2 * K + 1]:
                        raise WeightMismatchError(
                            f"HD-PiSSA weight mismatch at step {step}: layer {name!r}: rows {a}:{b} of W as FSDP2 "
                            f"gathers them for rank {viewer}'s forward differ from the rows rank {j}'s fold writes: "
                            f"the folds do not reach the forward (the tensor the fold updates is not the one "
                            f"FSDP2 gathers: was the weight's storage replaced after HD-PiSSA was injected?). {after}")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """What a resume must match (K, r, precision, layers), as strings."""
        return {"world_size": str(self.world_size), "r": str(self.config.r), "step": str(self.step),
                "precision": self.config.precision, "layers": ",".join(self.names),
                "lora_alpha": str(self.config.lora_alpha), "factor_convention": FACTOR_CONVENTION, "sharded": "rows",
                "config": json.dumps(self.config.to_dict())}

    def state_dict(self) -> dict:
        """The engine's resume state for ``torch.distributed.checkpoint``, aliasing the live tensors.

        ``A0_all`` (replicated), ``B0_all`` and the precision state as row-sharded DTensors, and every rank's own
        ``B0_j`` under a per-rank key (plain tensors with one key on every rank would be written once, by rank 0).
        Loading into this dict with ``dcp.load`` restores in place; then call :meth:`load_state_dict`.
        """
        layers, own = {}, {}
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            m, n, like = layer.out_features, layer.in_features, layer.base_layer.weight
            entry = {"A0_all": layer.A0_all,
                     "B0_all": _row_dtensor(layer.B0_rows, (m, self.world_size * layer.r), like)}
            for key, t in upd.state().items():
                entry[f"precision_{key}"] = _row_dtensor(t, (m, n), like)
            layers[name] = entry
            own[name] = layer.B0_own
        return {"layers": layers, f"B0_own_rank{self.rank}": own}

    @torch.no_grad()
    def load_state_dict(self, state: dict, step: int | None = None) -> None:
        """Finish a resume after ``dcp.load`` filled :meth:`state_dict` in place: copy whatever is not aliased, reset
        the adapters, restore ``step``."""
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            entry = state["layers"][name]
            if entry["A0_all"] is not layer.A0_all:
                layer.A0_all.copy_(entry["A0_all"])
            for key, dst in [("B0_all", layer.B0_rows)] + [(f"precision_{k}", t) for k, t in upd.state().items()]:
                src = entry[key].to_local()
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
            own = state[f"B0_own_rank{self.rank}"][name]
            if own is not layer.B0_own:
                layer.B0_own.copy_(own)
            layer.reset_adapter()
        if step is not None:
            self.step = step

    # -- merged model --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_state_dict(self, dtype: torch.dtype | None = None, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Collective: the plain model's state dict (``W`` at full known precision, no adapters), on CPU.

        Gathered one tensor at a time onto rank 0 (``rank0_only``; other ranks get ``{}``) or every rank.
        """
        reshard_all(self.model)
        masters = {f"{name}.base_layer.weight": upd.state().get("master")
                   for name, upd in zip(self.names, self.updaters)}
        on_rank0 = dist.get_rank(self.group) == 0
        out = {}
        for key, value in self.model.state_dict().items():
            if plain_key(key) is None:
                continue
            if is_row_sharded(value):
                master = masters.get(key)
                local = (master if master is not None else value.to_local()).to(value.dtype)
                if rank0_only:
                    value = gather_rows(local, value.shape[0], 0, shard_group(value)[0])
                else:
                    value = _row_dtensor(local, tuple(value.shape), value).full_tensor()
            if value is None or (rank0_only and not on_rank0):
                continue
            value = value.detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[plain_key(key)] = value
        return out

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Put the plain (still row-sharded) ``nn.Linear`` layers back, holding ``W`` at full known precision.

        The model stays sharded and in its dtype (``dtype`` is refused: cast the gathered
        :meth:`merged_state_dict` instead)."""
        if dtype is not None:
            raise ValueError("merge_and_unload(dtype=...) cannot recast a sharded model; use "
                             "merged_state_dict(dtype) or save_pretrained of the gathered state instead.")
        for layer, upd in zip(self.layers, self.updaters):
            master = upd.state().get("master")
            if master is not None:
                layer.base_layer.weight.to_local().copy_(master)
            _set_submodule(self.model, layer.name, layer.base_layer)  # the module path (names are canonical)
        self.layers, self.names, self.updaters = [], [], []
        return self.model


def shard_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                block_classes: tuple[type, ...] | None = None) -> nn.Module:
    """``fully_shard`` every transformer block and then the root, as accelerate's FSDP2 does; returns the model.

    For training loops without accelerate: shard first, then :func:`~hdpissa_trl.inject_hdpissa`. ``block_classes``
    default to the classes named in ``model._no_split_modules`` (the decoder layers of a ``transformers`` model).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if block_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or [])
        block_classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not block_classes:
        raise ValueError("shard_model found no transformer block to shard: pass block_classes (e.g. the decoder layer "
                         "class), or the whole model would be one FSDP unit gathered at once.")
    for module in list(model.modules()):
        if isinstance(module, block_classes):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model

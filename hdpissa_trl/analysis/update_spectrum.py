"""Singular-value spectrum and rank of the weight update ΔW = W_tuned − W_base, per weight matrix.

HD-PiSSA's claim is that folding per-device orthogonal adapters into the weight every step yields a *higher-rank*
update than a single LoRA/PiSSA adapter of the same size. This tool measures that directly on two checkpoints of one
architecture, whatever method produced the tuned one, so runs can be compared on the same axis:

    python -m hdpissa_trl.analysis.update_spectrum BASE_DIR TUNED_DIR --output_dir OUT

writes ``OUT/spectrum.png`` (σ_i of ΔW per layer, log scale, coloured by module type, plus effective rank against
depth) and ``OUT/effective_rank.csv`` (``layer,shape,numerical_rank,effective_rank``, one row per weight matrix).

Tensors are read straight from the safetensors files (single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) one pair at a time, so peak memory is about two matrices plus their difference, not
two models; nothing is instantiated through ``transformers``, which also means checkpoints whose modelling code is
not installed still work.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CSV_NAME = "effective_rank.csv"
PLOT_NAME = "spectrum.png"
CSV_HEADER = ("layer", "shape", "numerical_rank", "effective_rank")

# Embedding / output-head matrices are vocab-sized (the SVD is slow and memory-hungry there) and their update is
# dominated by which tokens happened to appear in the data, not by the adapter's rank, so they are skipped by default.
EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|embed_in|embed_out|wte|wpe|lm_head|word_embeddings|position_embeddings"
    r"|token_type_embeddings|shared)(\.|$)"
)


class CheckpointError(ValueError):
    """A user-facing problem with the checkpoints or the selection (the CLI prints it without a traceback)."""


@dataclass
class LayerSpectrum:
    """The spectrum of ΔW for one 2-D weight tensor.

    ``singular_values`` is the full spectrum (length ``min(shape)``, descending, fp32 on CPU); the ranks are derived
    from it with :func:`numerical_rank` and :func:`effective_rank` so they can be recomputed with other tolerances.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor = field(repr=False)
    numerical_rank: int
    effective_rank: float

    @property
    def module_type(self) -> str:
        """The name with the block index and ``.weight`` removed, e.g. ``self_attn.q_proj`` (for grouping/colour)."""
        return module_type(self.name)

    @property
    def block_index(self) -> int | None:
        """The transformer block this matrix belongs to (last integer in the name), or ``None`` outside blocks."""
        nums = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", self.name)
        return int(nums[-1]) if nums else None

    @property
    def is_zero(self) -> bool:
        """True when the checkpoints agree exactly on this matrix (frozen layer, or an untouched LoRA target)."""
        return self.singular_values.numel() == 0 or float(self.singular_values.max()) == 0.0

    @property
    def shape_str(self) -> str:
        """``rows x cols`` as stored, e.g. ``576x1536``."""
        return "x".join(str(d) for d in self.shape)


def module_type(name: str) -> str:
    """Group key for a tensor name: the part after the last integer component, without a trailing ``.weight``.

    ``model.layers.3.mlp.down_proj.weight`` → ``mlp.down_proj``; names without a block index keep their full stem.
    """
    parts = name.split(".")
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    last_num = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    tail = parts[last_num + 1:]
    return ".".join(tail) if tail else ".".join(parts)


def _as_float64(sv: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(sv, torch.Tensor):
        sv = sv.detach().to("cpu", torch.float64).numpy()
    return np.abs(np.asarray(sv, dtype=np.float64).ravel())


def numerical_rank(sv: torch.Tensor | np.ndarray | Sequence[float], rel_tol: float = 1e-4) -> int:
    """Number of singular values strictly above ``rel_tol`` × the largest; 0 for an empty or all-zero spectrum.

    A relative threshold makes the count independent of the update's scale (learning rate, number of steps); 1e-4 is
    far above the round-off floor of the difference of two fp32 checkpoints (~1e-7 relative) yet below any direction a
    training run actually moved. bf16/fp16 checkpoints differ: rounding the tuned weights to 16-bit precision adds a
    full-rank noise floor far above 1e-4, so there the count is ~min(m, n) whatever the method; use a larger
    ``rel_tol`` or read :func:`effective_rank`, which that floor barely moves.
    """
    s = _as_float64(sv)
    if s.size == 0:
        return 0
    top = float(s.max())
    if top <= 0.0 or not math.isfinite(top):
        return 0
    return int(np.count_nonzero(s > rel_tol * top))


def effective_rank(sv: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Entropy effective rank exp(H(p)), p = σ / Σσ (Roy & Vetterli, 2007); 0 for an empty or all-zero spectrum.

    Unlike the numerical rank it has no threshold and weighs directions by their energy: k equal singular values give
    exactly k, and a long tail of tiny ones barely moves it, so it separates "many directions used" from "a few
    directions used plus noise".
    """
    s = _as_float64(sv)
    total = float(s.sum())
    if s.size == 0 or total <= 0.0 or not math.isfinite(total):
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


# ----------------------------------------------------------------------------------------------------------- loading
class _SafetensorsCheckpoint:
    """Lazy, name-addressed access to the tensors of one checkpoint directory (single file or sharded).

    Shards are opened once with ``safe_open`` (memory-mapped) and tensors are materialised one at a time, so
    inspecting shapes/dtypes of a 70B checkpoint costs only its headers.
    """

    def __init__(self, path: str | os.PathLike, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        self.files = _locate_weight_files(self.path)
        self._stack = stack
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        for file, names in self.files.items():
            handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            self._handles[file] = handle
            for name in names if names is not None else handle.keys():
                self._where[name] = file

    def names(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def config(self) -> dict | None:
        cfg = os.path.join(self.path, "config.json") if os.path.isdir(self.path) else None
        if cfg is None or not os.path.isfile(cfg):
            return None
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)


def _locate_weight_files(path: str) -> dict[str, list[str] | None]:
    """Map each safetensors file of a checkpoint to the tensor names it holds (``None``: read them from its header).

    Accepts a directory with ``model.safetensors`` or ``model.safetensors.index.json``, or a single ``.safetensors``
    file. Errors say what *was* found: the usual mistake is pointing at a PEFT adapter or a ``.bin`` checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path!r} does not exist.")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path!r} is a file but not a .safetensors file.")
        return {path: None}
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        if not weight_map:
            raise CheckpointError(f"{index!r} has an empty or missing 'weight_map'.")
        files: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"Shard {shard!r} listed in {index!r} (for tensor {name!r}) is missing.")
            files.setdefault(shard_path, []).append(name)
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return {single: None}
    present = sorted(os.listdir(path))
    hint = ""
    if "adapter_model.safetensors" in present:
        hint = " It looks like a PEFT adapter: merge it into the base (merge_and_unload + save_pretrained) first."
    elif any(p.endswith((".bin", ".pt", ".pth")) for p in present):
        hint = " Only PyTorch pickle weights found: re-save with save_pretrained(..., safe_serialization=True)."
    shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
    raise CheckpointError(f"No {SINGLE_FILE} or {INDEX_FILE} in {path!r} (it contains: {shown}).{hint}")


def _is_float_dtype(dtype: str) -> bool:
    # safetensors dtype tags: F64/F32/F16/BF16/F8_E4M3/... are floating; I*/U*/BOOL (incl. packed 4-bit) are not.
    return dtype.startswith(("F", "BF"))


def _natural_key(name: str) -> list:
    """Sort ``layers.10`` after ``layers.9``: compare digit runs as integers."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _check_configs(base: _SafetensorsCheckpoint, tuned: _SafetensorsCheckpoint) -> None:
    base_cfg, tuned_cfg = base.config(), tuned.config()
    if not base_cfg or not tuned_cfg:
        return
    for key in ("model_type", "architectures"):
        b, t = base_cfg.get(key), tuned_cfg.get(key)
        if b is not None and t is not None and b != t:
            raise CheckpointError(
                f"Architectures disagree: config.json {key} is {b!r} in {base.path!r} but {t!r} in {tuned.path!r}."
            )


def _select_tensors(
    base: _SafetensorsCheckpoint,
    tuned: _SafetensorsCheckpoint,
    layers: str | None,
    max_layers: int | None,
    include_embeddings: bool,
) -> list[str]:
    """Names of the 2-D floating tensors both checkpoints share, filtered; raise if shapes disagree or none remain."""
    tuned_names = set(tuned.names())
    common = [n for n in base.names() if n in tuned_names]
    only_base = len(base.names()) - len(common)
    only_tuned = len(tuned_names) - len(common)
    if not common:
        raise CheckpointError(
            f"The checkpoints share no tensor names ({base.path!r} has e.g. {sorted(base.names())[:3]}, "
            f"{tuned.path!r} has e.g. {sorted(tuned_names)[:3]}): different architectures or a different save prefix."
        )
    if only_base or only_tuned:
        logger.warning("%d tensors only in the base and %d only in the tuned checkpoint are ignored.",
                       only_base, only_tuned)

    selected = []
    for name in sorted(common, key=_natural_key):
        b_shape, t_shape = base.shape(name), tuned.shape(name)
        is_embedding = EMBEDDING_PATTERN.search(name) is not None
        if not include_embeddings and is_embedding:
            # Checked before the shapes: fine-tunes that add tokens resize these, which is no architecture mismatch.
            if b_shape != t_shape:
                logger.warning("Skipping %s: vocabulary resized (%s vs %s).", name, list(b_shape), list(t_shape))
            continue
        if b_shape != t_shape:
            hint = " (vocabulary resized? drop include_embeddings)" if is_embedding else ""
            raise CheckpointError(
                f"Shapes disagree for tensor {name!r}: {list(b_shape)} in {base.path!r} vs {list(t_shape)} in "
                f"{tuned.path!r}{hint}. The checkpoints must be of one architecture and size."
            )
        if len(b_shape) != 2 or not (_is_float_dtype(base.dtype(name)) and _is_float_dtype(tuned.dtype(name))):
            continue
        selected.append(name)

    if layers is not None:
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise CheckpointError(f"Invalid --layers regex {layers!r}: {exc}") from exc
        selected = [n for n in selected if pattern.search(n)]
    if not selected:
        what = f" matching --layers {layers!r}" if layers is not None else ""
        emb = "" if include_embeddings else " (embeddings/lm_head are skipped unless include_embeddings)"
        raise CheckpointError(f"No 2-D floating weight matrix{what} is present in both checkpoints{emb}.")
    if max_layers is not None:
        if max_layers < 1:
            raise CheckpointError(f"max_layers must be >= 1, got {max_layers}.")
        selected = selected[:max_layers]
    return selected


def compute_update_spectrum(
    base_dir: str | os.PathLike,
    tuned_dir: str | os.PathLike,
    layers: str | None = None,
    max_layers: int | None = None,
    include_embeddings: bool = False,
    rel_tol: float = 1e-4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[LayerSpectrum]:
    """Singular values and ranks of ΔW = W_tuned − W_base for every 2-D weight matrix the two checkpoints share.

    Args:
        base_dir, tuned_dir: checkpoint directories (``model.safetensors`` or sharded index) or ``.safetensors`` files.
        layers: regex searched in tensor names (e.g. ``"q_proj|v_proj"`` or ``r"layers\\.(0|11)\\."``).
        max_layers: keep only the first N selected matrices in natural name order (quick looks at big models).
        include_embeddings: also analyse embedding / lm_head matrices (vocab-sized, slow).
        rel_tol: relative threshold of :func:`numerical_rank`.
        device: where the SVD runs (``"cuda"`` helps a lot for 7B+ models); results come back on CPU.
        progress: show a tqdm bar over matrices.

    Returns one :class:`LayerSpectrum` per matrix, in natural name order. Both tensors are upcast to fp32 before the
    subtraction so bf16/fp16 checkpoints give the exact difference of their stored values.
    """
    from tqdm.auto import tqdm

    with ExitStack() as stack:
        base = _SafetensorsCheckpoint(base_dir, stack)
        tuned = _SafetensorsCheckpoint(tuned_dir, stack)
        _check_configs(base, tuned)
        names = _select_tensors(base, tuned, layers, max_layers, include_embeddings)
        results = []
        for name in tqdm(names, desc="SVD of ΔW", unit="layer", disable=not progress):
            delta = tuned.get(name).to(device=device, dtype=torch.float32) - base.get(name).to(
                device=device, dtype=torch.float32
            )
            if not torch.isfinite(delta).all():
                raise CheckpointError(f"Tensor {name!r} has non-finite values (NaN/Inf) in one of the checkpoints.")
            if torch.count_nonzero(delta) == 0:
                # Untouched matrix: skip the SVD (frozen layers are the common case for adapter methods).
                sv = torch.zeros(min(delta.shape), dtype=torch.float32)
            else:
                sv = torch.linalg.svdvals(delta).cpu()
            del delta
            results.append(
                LayerSpectrum(
                    name=name,
                    shape=tuple(base.shape(name)),
                    singular_values=sv,
                    numerical_rank=numerical_rank(sv, rel_tol),
                    effective_rank=effective_rank(sv),
                )
            )
    return results


# ----------------------------------------------------------------------------------------------------------- writing
def write_effective_rank_csv(spectra: Sequence[LayerSpectrum], path: str | os.PathLike) -> str:
    """Write ``layer,shape,numerical_rank,effective_rank`` (one row per matrix) and return the path."""
    path = os.fspath(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for s in spectra:
            writer.writerow([s.name, s.shape_str, s.numerical_rank, f"{s.effective_rank:.6f}"])
    return path


def _palette(types: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(types) <= 10 else "tab20" if len(types) <= 20 else "turbo"]
    n = len(types)
    if cmap.N < 256:
        return {t: cmap(i % cmap.N) for i, t in enumerate(types)}
    return {t: cmap(i / max(n - 1, 1)) for i, t in enumerate(types)}


def plot_spectrum(
    spectra: Sequence[LayerSpectrum],
    path: str | os.PathLike,
    title: str = "Spectrum of ΔW",
    top_k: int | None = 64,
) -> str:
    """Save a two-panel PNG: σ_i of ΔW per matrix (log y, colour = module type) and effective rank against depth.

    One thin line per matrix keeps per-layer detail visible while the colour groups make the typical shape of each
    module type readable; matrices with ΔW = 0 cannot be drawn on a log axis and are counted in a note instead.
    Uses the object-oriented Figure API so it never touches (or needs) a GUI backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = os.fspath(path)
    types = list(dict.fromkeys(s.module_type for s in spectra))
    colours = _palette(types)
    fig = Figure(figsize=(14, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_sv, ax_er = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})

    drawn = 0
    zero = [s for s in spectra if s.is_zero]
    for s in spectra:
        if s.is_zero:
            continue
        sv = s.singular_values.to(torch.float64).numpy()
        if top_k:
            sv = sv[:top_k]
        sv = np.where(sv > 0, sv, np.nan)  # exact zeros have no place on a log axis
        ax_sv.plot(np.arange(1, sv.size + 1), sv, color=colours[s.module_type], alpha=0.55, linewidth=1.0)
        drawn += 1
    if drawn:
        ax_sv.set_yscale("log")
    ax_sv.set_xlabel("singular value index i" + (f" (top {top_k})" if top_k else ""))
    ax_sv.set_ylabel("σ_i(W_tuned − W_base)")
    ax_sv.set_title(f"Singular values, {drawn} matrices")
    ax_sv.grid(True, which="both", alpha=0.3)
    if zero:
        ax_sv.text(0.99, 0.99, f"{len(zero)} matrices with ΔW = 0 not drawn", transform=ax_sv.transAxes,
                   ha="right", va="top", fontsize=9, color="0.3")

    for t in types:
        group = [s for s in spectra if s.module_type == t]
        xs = [s.block_index if s.block_index is not None else i for i, s in enumerate(group)]
        ax_er.plot(xs, [s.effective_rank for s in group], marker="o", markersize=3, linewidth=1.0,
                   color=colours[t], label=t)
    ax_er.set_xlabel("block index")
    ax_er.set_ylabel("effective rank exp(H(σ/Σσ))")
    ax_er.set_title("Effective rank by depth")
    ax_er.set_ylim(bottom=0)
    ax_er.grid(True, alpha=0.3)
    # One legend for both panels (same colours), outside the axes so it never hides a spectrum.
    handles = [Line2D([], [], color=colours[t], linewidth=2, label=t) for t in types]
    fig.legend(handles=handles, title="module type", fontsize=8, loc="outside right upper",
               ncol=1 if len(types) <= 24 else 2)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def _basename(path: str | os.PathLike) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(os.fspath(path))))


# --------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hdpissa_trl.analysis.update_spectrum",
        description="Singular-value spectrum and effective rank of W_tuned − W_base for every weight matrix of two "
        "safetensors checkpoints of one architecture. Writes spectrum.png and effective_rank.csv.",
    )
    parser.add_argument("base_dir", help="base checkpoint dir (model.safetensors or sharded index)")
    parser.add_argument("tuned_dir", help="fine-tuned checkpoint dir of the same architecture")
    parser.add_argument("--output_dir", required=True, help="where spectrum.png and effective_rank.csv go")
    parser.add_argument("--layers", default=None, help="regex searched in tensor names, e.g. 'q_proj|v_proj'")
    parser.add_argument("--max_layers", type=int, default=None, help="analyse only the first N matching matrices")
    parser.add_argument("--top_k", type=int, default=64, help="singular values plotted per matrix (0 = all)")
    parser.add_argument("--include_embeddings", action="store_true", help="also analyse embeddings and lm_head")
    parser.add_argument("--rel_tol", type=float, default=1e-4,
                        help="relative threshold of the numerical rank (raise it for bf16/fp16 checkpoints)")
    parser.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    parser.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a problem with the inputs, reported without a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        spectra = compute_update_spectrum(
            args.base_dir,
            args.tuned_dir,
            layers=args.layers,
            max_layers=args.max_layers,
            include_embeddings=args.include_embeddings,
            rel_tol=args.rel_tol,
            device=args.device,
            progress=not args.no_progress,
        )
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"update_spectrum: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = write_effective_rank_csv(spectra, os.path.join(args.output_dir, CSV_NAME))
    title = f"Update spectrum ΔW = {_basename(args.tuned_dir)} (tuned) − {_basename(args.base_dir)} (base)"
    try:
        png_path = plot_spectrum(spectra, os.path.join(args.output_dir, PLOT_NAME), title=title,
                                 top_k=args.top_k or None)
    except ImportError as exc:  # matplotlib is an optional extra; the CSV is still useful without it
        print(f"update_spectrum: error: plotting needs matplotlib (pip install matplotlib): {exc}; wrote {csv_path}",
              file=sys.stderr)
        return 1
    changed = [s for s in spectra if not s.is_zero]
    print(f"{len(spectra)} matrices, {len(changed)} changed; wrote {csv_path} and {png_path}")
    if changed:
        mean_er = sum(s.effective_rank for s in changed) / len(changed)
        print(f"mean effective rank of changed matrices: {mean_er:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What adapter users ship: an HD-PiSSA run's whole update as a PEFT LoRA adapter on the model it started from.

``trainer.save_adapter(path)`` factors every adapted layer's ``ΔW = W_final − W_start`` (the engine's
:mod:`~hdpissa_trl.engine.export`: the rank-``2·K·r`` construction from the run's fixed directions, refined, or a
truncated SVD) and writes PEFT's own files: ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``), loadable with ``PeftModel.from_pretrained(base, path)``
and nothing of this library, plus a card (``library_name: peft``) stating how exactly the adapter reproduces the
trained model. ``W_start`` is read back from the checkpoint the run started from, one layer at a time.

Scaling: every layer's ``lora_alpha`` equals its rank (global ``lora_alpha = r``, and ``alpha_pattern`` = ``rank_pattern``
where a layer's rank differs), so ``ΔW ≈ B·A`` with scale 1 in PEFT and in vLLM (which reads one ``lora_alpha / r``
and takes each module's rank from its tensors).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.export import export_updates, overall_relative_error, resolve_factorization
from .hub import looks_like_hub_id

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# Ranks vLLM's LoRAConfig accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks in recent releases).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that serves an adapter of ``rank`` (None above vLLM's largest)."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


@dataclass
class AdapterExport:
    """What :meth:`HDPiSSATrainerMixin.save_adapter` wrote and how exactly it reproduces the trained model."""

    path: str
    rank: int  # the adapter config's r: the largest per-layer rank
    ranks: dict[str, int] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)  # ‖ΔW − B·A‖ / ‖ΔW‖ per layer
    relative_error: float = 0.0  # the same over the whole model
    factorization: str = "refined"
    dtype: str = "float32"
    seconds: float = 0.0
    adapter_bytes: int = 0  # adapter_model.safetensors
    model_bytes: int = 0  # the whole model in the training dtype (what the merged model weighs)
    base_model_name_or_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- reading the starting weights ----------------------------------------------------------------------------------
class StartingWeights:
    """The weights of the checkpoint a run started from, read one tensor at a time (safetensors, memory-mapped).

    ``source``: a local directory (``model.safetensors``, sharded ``*.safetensors`` with their index, or
    ``pytorch_model*.bin``), one ``.safetensors`` file, or a Hub id (resolved through the local cache or downloaded;
    offline, the cache only).
    """

    def __init__(self, source: str, revision: str | None = None):
        self.source = source
        files = self._files(source, revision)
        self._where: dict[str, str] = {}
        self._bin: dict[str, dict] = {}
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(f, "pt") as handle:
                    for key in handle.keys():
                        self._where[key] = f
            else:
                self._bin[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                for key in self._bin[f]:
                    self._where[key] = f

    @staticmethod
    def _files(source: str, revision: str | None) -> list[str]:
        if os.path.isfile(source):
            if not source.endswith((".safetensors", ".bin")):
                raise ValueError(f"base_model={source!r} is a file but not a .safetensors / .bin checkpoint. Pass the "
                                 f"directory of the plain checkpoint the run started from (for a GGUF source: the "
                                 f"converted checkpoint, `python -m hdpissa_trl.scripts.gguf SRC OUT`).")
            return [source]
        directory = source
        if not os.path.isdir(source):
            from huggingface_hub import snapshot_download

            try:
                directory = snapshot_download(source, revision=revision, allow_patterns=[
                    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json"])
            except Exception as exc:
                raise ValueError(f"Cannot read the starting weights from base_model={source!r}: it is no local "
                                 f"directory and the Hub gave no files ({type(exc).__name__}: {exc}). Pass the "
                                 f"directory of the checkpoint the run started from as base_model.") from exc
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
        if not files:
            raise ValueError(f"No weights (*.safetensors or pytorch_model*.bin) in {source!r}: pass the directory of "
                             f"the checkpoint the run started from as base_model.")
        return files

    def key_for(self, name: str) -> str:
        """The checkpoint key of layer ``name``'s weight (``name.weight``; also with a leading ``model.`` added or
        removed, for checkpoints of the bare backbone)."""
        candidates = [f"{name}.weight"]
        head, _, rest = name.partition(".")
        if rest:
            candidates.append(f"{rest}.weight")
        candidates.append(f"model.{name}.weight")
        for key in candidates:
            if key in self._where:
                return key
        raise KeyError(f"The starting checkpoint {self.source!r} has no weight for layer {name!r} (looked for "
                       f"{', '.join(candidates)}). Pass the checkpoint the run started from as base_model.")

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        if f in self._bin:
            return tuple(self._bin[f][key].shape)
        from safetensors import safe_open

        with safe_open(f, "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def __call__(self, name: str) -> torch.Tensor:
        key = self.key_for(name)
        f = self._where[key]
        if f in self._bin:
            return self._bin[f][key]
        from safetensors import safe_open

        with safe_open(f, "pt") as handle:
            return handle.get_tensor(key)


def _starting_source(trainer, base_model: str | None) -> str:
    if base_model is not None:
        return str(base_model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError("save_adapter needs the weights the run started from, and this model has no name_or_path "
                         "(built in memory?). Save the starting model before training and pass its directory: "
                         "trainer.save_adapter(path, base_model=DIR).")
    return str(name)


def _task_type(model) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


# -- the export ----------------------------------------------------------------------------------------------------
def save_adapter(trainer, path: str | None = None, *, base_model: str | None = None,
                 base_model_name_or_path: str | None = None, rank: int | None = None, factorization: str = "auto",
                 dtype: torch.dtype = torch.float32, error_warning: float = 0.05,
                 run_info: dict[str, Any] | None = None, eval_report: dict | None = None,
                 eval_before: dict | None = None, model_name: str | None = None) -> AdapterExport | None:
    """The body of :meth:`HDPiSSATrainerMixin.save_adapter` (see there); returns the export on rank 0."""
    engine = getattr(trainer, "hdpissa_engine", None)
    if trainer.method != "hdpissa" or engine is None:
        what = ("full fine-tuning has no low-rank update to export: trainer.save_model() writes the model"
                if trainer.method == "full" else
                "a PEFT LoRA / PiSSA run's adapter is already the trained model: trainer.model.save_pretrained(path)")
        raise ValueError(f"save_adapter exports an HD-PiSSA run's update; this trainer trains method="
                         f"{trainer.method!r}: {what}.")
    how = resolve_factorization(factorization, engine.config.subspace, rank)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}.")
    if not 0 < float(error_warning):
        raise ValueError(f"error_warning must be a positive fraction (0.05 = 5 %), got {error_warning!r}.")
    path = path or os.path.join(trainer.args.output_dir, ADAPTER_DIR)
    source = _starting_source(trainer, base_model)
    weights = StartingWeights(source)  # every rank checks the checkpoint's keys and shapes before any work
    for name, layer in zip(engine.names, engine.layers):
        shape = weights.shape(weights.key_for(name))
        if shape != (layer.out_features, layer.in_features):
            raise ValueError(f"The starting checkpoint {source!r} holds {name!r} with shape {shape}, the trained model "
                             f"{(layer.out_features, layer.in_features)}: base_model is another model.")
    model = trainer.accelerator.unwrap_model(trainer.model)
    t0 = time.perf_counter()
    updates = export_updates(engine, weights, rank=rank, factorization=how, dtype=dtype,
                             samples=getattr(trainer, "_hdpissa_start_samples", None))
    seconds = time.perf_counter() - t0
    result = None
    if trainer.accelerator.is_main_process:
        base_name = base_model_name_or_path or source
        ranks = {name: u.rank for name, u in updates.items()}
        R = max(ranks.values())
        result = AdapterExport(
            path=path, rank=R, ranks=ranks, layer_errors={n: u.relative_error for n, u in updates.items()},
            relative_error=overall_relative_error(list(updates.values())),
            factorization=", ".join(sorted({u.factorization for u in updates.values()})),
            dtype=str(dtype).replace("torch.", ""), seconds=seconds,
            model_bytes=sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                            if not p.requires_grad),  # the model's own (frozen) weights, not the adapters
            base_model_name_or_path=base_name)
        for name in engine.names:
            logger.info("adapter export: %s rank %d, ||dW|| %.4g, relative error %.3g %%", name, ranks[name],
                        updates[name].delta_norm, 100 * result.layer_errors[name])
        _write(path, updates, result, _task_type(model))
        result.adapter_bytes = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
        info = {**trainer.hdpissa_card_info(), **(run_info or {})}
        write_adapter_card(os.path.join(path, "README.md"), result, info, eval_report, eval_before,
                           model_name or os.path.basename(os.path.abspath(path.rstrip("/"))))
        trainer.accelerator.print(
            f"HD-PiSSA adapter: {path} (LoRA rank {R}, {result.adapter_bytes / 2**20:.2f} MiB against "
            f"{result.model_bytes / 2**20:.1f} MiB for the whole model; {result.factorization}; relative error of "
            f"the update {100 * result.relative_error:.3g} % overall, at most "
            f"{100 * max(result.layer_errors.values()):.3g} % in one layer; {seconds:.1f} s).")
        worst = sorted(result.layer_errors.items(), key=lambda kv: -kv[1])[:3]
        if result.relative_error > error_warning:
            logger.warning(
                "The exported adapter reproduces the run's update with a relative error of %.3g %% (above "
                "error_warning=%.3g %%); worst layers: %s. %s", 100 * result.relative_error, 100 * error_warning,
                ", ".join(f"{n} {100 * e:.3g} %" for n, e in worst),
                "A larger rank lowers it (rank=...), or ship the merged model (save_model)." if how == "svd" or rank else
                "The run's second-order part is large (a high learning rate?); the merged model (save_model) is exact.")
    trainer.accelerator.wait_for_everyone()
    return result


def _write(path: str, updates: dict, result: AdapterExport, task_type: str | None) -> None:
    """PEFT's files, written into a temporary directory next to ``path`` and moved in (README last)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    R = result.rank
    pattern = {name: r for name, r in result.ranks.items() if r != R}
    config = LoraConfig(r=R, lora_alpha=R, target_modules=list(updates), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type=task_type,
                        base_model_name_or_path=result.base_model_name_or_path, inference_mode=True)
    tensors = {}
    for name, u in updates.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = u.A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = u.B.contiguous()
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        # PEFT keeps target_modules as a set (written in hash order, another order every process): sort it, so the
        # same adapter gives the same file.
        config_path = os.path.join(tmp, "adapter_config.json")
        with open(config_path) as f:
            written = json.load(f)
        written["target_modules"] = sorted(written["target_modules"])
        with open(config_path, "w") as f:
            json.dump(written, f, indent=2, sort_keys=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(os.path.join(tmp, f), os.path.join(path, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the card ------------------------------------------------------------------------------------------------------
def write_adapter_card(card_path: str, result: AdapterExport, info: dict[str, Any], report: dict | None,
                       before: dict | None, model_name: str) -> None:
    """A PEFT-style card: ``library_name: peft``, ``base_model``, the method, the error figures, the evaluation."""
    from huggingface_hub import ModelCard, ModelCardData

    from .card import _public_name, _settings_table, eval_results_for_card

    base = result.base_model_name_or_path
    hub_base = base if looks_like_hub_id(base, namespaced=True) else None
    # A local starting directory (a GGUF conversion in the cache is named by its hash) is shown by the name the user
    # gave (the recipe's "base model"), never by a path of the machine that trained.
    named = info.get("base model")
    shown_base = hub_base or (_public_name(str(named or base)) if (named or base) else "the starting model")
    results = eval_results_for_card(report, model_name)
    data = ModelCardData(library_name="peft", base_model=hub_base, pipeline_tag="text-generation",
                         tags=["hd-pissa", "lora", "peft", "trl"] + ([f"base_model:adapter:{hub_base}"] if hub_base
                                                                        else []),
                         model_name=model_name if results else None, eval_results=results or None)
    K = info.get("devices K")
    vllm = vllm_max_lora_rank(result.rank)
    errors = result.layer_errors
    worst = max(errors, key=errors.get)
    distinct = sorted(set(result.ranks.values()), reverse=True)
    exact = "B = [U | (I−UUᵀ)ΔW·V], A = [UᵀΔW ; Vᵀ] from the run's fixed directions U, V"
    how = {"exact": f"exact rank-2·K·r construction {exact} (it leaves out the second-order part of the folds)",
           "refined": f"the columns of {exact}, refined by a subspace iteration towards ΔW's top singular directions, "
                      f"with the best A for them (never a larger error than that construction's second-order part)",
           "svd": "truncated SVD of ΔW (the best approximation of that rank)"}
    lines = [
        f"# {model_name}", "",
        f"A [PEFT](https://github.com/huggingface/peft) LoRA adapter holding the whole weight update of an **HD-PiSSA** "
        f"run (High-rank Distributed PiSSA, arXiv 2505.18777) on `{shown_base}`: ΔW = W_final − W_start of every "
        f"adapted layer, factored as B·A. Load it on the base model with plain PEFT, or serve it with vLLM's "
        f"multi-LoRA. The merged model of the same run is exact; this adapter reproduces it within the error below.",
        "", "## How exactly it reproduces the trained model", "",
        "| figure | value |", "|---|---|",
        f"| relative error of the update, whole model (‖ΔW − B·A‖ / ‖ΔW‖) | {100 * result.relative_error:.3g} % |",
        f"| largest per-layer error | {100 * errors[worst]:.3g} % (`{worst}`) |",
        f"| factorization | {'; '.join(how[f] for f in result.factorization.split(', '))} |",
        f"| LoRA rank | {result.rank}"
        + (f" (2·K·r = {info['update rank per step (2·K·r)']}, K = {K})" if "update rank per step (2·K·r)" in info
           else "")
        + (f"; per-layer ranks {distinct} through `rank_pattern`" if len(distinct) > 1 else "") + " |",
        f"| adapter dtype | {result.dtype} |",
        f"| adapter size | {result.adapter_bytes / 2**20:.2f} MiB (the whole model: {result.model_bytes / 2**20:.1f} MiB) |",
        f"| export time | {result.seconds:.1f} s |", "",
        "<details><summary>Relative error per layer</summary>", "", "| layer | rank | relative error |", "|---|---|---|",
        *[f"| `{n}` | {result.ranks[n]} | {100 * e:.3g} % |" for n, e in errors.items()],
        "", "</details>", "",
    ]
    if results:
        lines += ["## Evaluation", "", "Scores of the merged model of this run (the adapter on the base model reproduces "
                  "it within the error above).", "", "| task | metric | before | after | n |", "|---|---|---|---|---|"]
        before_res = (before or {}).get("results") or {}
        for task, res in report["results"].items():
            b = before_res.get(task, {}).get("value")
            lines.append(f"| {task} | {res.get('metric')} | {'' if b is None else f'{b:.4f}'} | {res['value']:.4f} | "
                         f"{res.get('n', '')} |")
        lines.append("")
    load_base = hub_base or "<the base model>"
    lines += [
        "## How to load", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{load_base}")',
        'model = PeftModel.from_pretrained(base, "<this repo or directory>")',
        "model = model.merge_and_unload()  # optional: a plain model again", "```", "",
        "Load the base model in the dtype the run trained in: the update was measured against those weights.", "",
        "## Serving with vLLM", "",
    ]
    if vllm is not None:
        lines += [f"vLLM needs `max_lora_rank >= {result.rank}`; it accepts {', '.join(map(str, VLLM_MAX_LORA_RANKS))}, "
                  f"so: `vllm serve {load_base} --enable-lora --max-lora-rank {vllm} --lora-modules "
                  f"{model_name}=<this directory>`. (Not run here: serving needs a GPU.)", ""]
    else:
        lines += [f"This adapter's rank {result.rank} is above the largest `max_lora_rank` vLLM accepts "
                  f"({VLLM_MAX_LORA_RANKS[-1]}): serve the merged model, or export a smaller rank "
                  f"(`save_adapter(rank=...)`, truncated SVD, with its error).", ""]
    lines += ["## Training", "", _settings_table({k: v for k, v in info.items() if k != "datasets"}), ""]
    if info.get("datasets"):
        lines += ["### Data", ""] + [f"- `{_public_name(d)}`" for d in info["datasets"]] + [""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(card_path)


# -- the Hub -------------------------------------------------------------------------------------------------------
def push_adapter(trainer, repo_id: str | None = None, path: str | None = None, *, token: str | None = None,
                 private: bool | None = None, revision: str | None = None,
                 commit_message: str = "Upload HD-PiSSA adapter") -> str | None:
    """Upload a saved adapter directory (rank 0; the others return None). Returns the commit URL."""
    path = path or os.path.join(trainer.args.output_dir, ADAPTER_DIR)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"No adapter at {path!r}: call trainer.save_adapter() (on every rank) first.")
    if not trainer.is_world_process_zero():
        return None
    from huggingface_hub import HfApi

    if repo_id is None:
        hub = trainer.args.hub_model_id or os.path.basename(os.path.abspath(trainer.args.output_dir))
        repo_id = f"{hub}-adapter"
    api = HfApi(token=token if token is not None else trainer.args.hub_token)
    repo = api.create_repo(repo_id, private=private if private is not None else trainer.args.hub_private_repo,
                           exist_ok=True)
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=path, commit_message=commit_message,
                             revision=revision, ignore_patterns=[".tmp-*"])
    return str(getattr(info, "commit_url", info))

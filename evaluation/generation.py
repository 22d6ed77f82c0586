"""Batched generation and continuation log-likelihoods for any ``AutoModelForCausalLM``.

Generation pads on the LEFT (the tokenizer's own ``pad(..., padding_side="left")``, the caller's tokenizer is not
changed) so every prompt ends at the same position and new tokens line up across the batch. Prompts are sorted by
length so batches waste little padding. Stop sequences are checked on the generated text only and the output is
truncated at the first one: transformers' built-in ``stop_strings`` also match a stop string that starts in the
prompt (a prompt ending in a newline, then ``#`` generated, is ``"\n#"``: a code completion would end at once), so a
small criterion of our own looks at the generated tokens only. An optional vLLM backend is used only when ``vllm``
is importable and CUDA is available.

Sharding (``shard=(index, count)``): K processes each run every K-th batch of the one-process batch plan
(:func:`batch_plan`), so each item is padded, batched and (with sampling) seeded exactly as one process would do it,
and the shares together give the one-process outputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _pad_id(tokenizer, model) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None),
                      getattr(model.config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _max_length(model, tokenizer) -> int:
    for value in (getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None),
                  getattr(tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10**7:
            return value
    return 2048


class _StopOnStrings(StoppingCriteria):
    """Per-sequence stop once any stop string appears in the *generated* tail (the prompt is never searched)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, [s for s in stop if s], prompt_length
        self.window = max(16, 4 * max((len(s) for s in self.stop), default=0))  # >= tokens a stop spans

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:][:, -self.window:],
                                            skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in tails], dtype=torch.bool,
                            device=input_ids.device)


def _with_pad_token(tokenizer, pad_id: int):
    """``tokenizer`` itself when it has a pad token, else a copy padding with ``pad_id`` (the caller's stays as is).

    The pad value never reaches the model (the attention mask hides it); ``tokenizer.pad`` just needs one."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    import copy

    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.convert_ids_to_tokens(pad_id)
    return padded


def _pad(tokenizer, batch: list[list[int]], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer.pad({"input_ids": batch}, padding=True, padding_side=side, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def batch_plan(lengths: Sequence[int], batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, list[int]]]:
    """The batches ``(number, item indices)`` that shard ``index`` of ``count`` runs.

    Items are sorted by length, longest first (stable, so ties keep their order), cut into batches of ``batch_size``,
    and batch ``b`` goes to shard ``b % count``: every shard's batches are batches of the one-process plan, with the
    same items and the same padding.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [(number, items) for number, items in enumerate(batches) if number % count == index]


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8,
             num_samples: int = 1, temperature: float = 0.8, top_p: float = 0.95, stop: Sequence[str] = (),
             add_special_tokens: bool = True, show_progress: bool = True, desc: str = "generating",
             shard: tuple[int, int] = (0, 1), seed: int | None = None) -> list[list[str]]:
    """``num_samples`` completions per prompt (greedy when 1, sampling otherwise), truncated at ``stop``.

    With ``shard=(index, count)`` only that shard's batches are generated; the other prompts get ``[]``. With sampling
    and a ``seed``, batch ``b`` is drawn after ``torch.manual_seed(seed + b)``, so a prompt's samples do not depend on
    how many shards there are.
    """
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    padder = _with_pad_token(tokenizer, pad_id)
    limit = max(1, _max_length(model, tokenizer) - max_new_tokens)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"][-limit:] for p in prompts]
    plan = batch_plan([len(e) for e in encoded], batch_size, shard)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    sampling = num_samples > 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=num_samples,
                              pad_token_id=pad_id, eos_token_id=eos,
                              **({"temperature": temperature, "top_p": top_p} if sampling else {}))
    outputs: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for number, index in tqdm(plan, desc=desc, disable=not show_progress, unit="batch"):
            if sampling and seed is not None:
                torch.manual_seed(seed + number)
            input_ids, attention_mask = _pad(padder, [encoded[i] for i in index], "left", device)
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, input_ids.shape[1])]) if stop else None
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                       stopping_criteria=criteria)
            texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
            for j, text in enumerate(texts):
                outputs[index[j // num_samples]].append(truncate_at_stop(text, stop))
    finally:
        model.train(was_training)
    return outputs


def _split_continuation(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list, list]:
    """Token ids of context and continuation such that context + continuation tokenises as in one piece.

    Trailing whitespace moves from the context to the continuation (tokenizers attach spaces to the next word),
    then the continuation's ids are whatever follows the context's ids in the joint encoding. This is the split of
    EleutherAI's lm-evaluation-harness (``HFLM._encode_pair``), so multiple-choice log-likelihoods compare with its
    numbers; one addition: when the joint encoding does not start with the context's ids, the continuation is encoded
    on its own.
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   add_special_tokens: bool = True, show_progress: bool = True,
                   desc: str = "scoring choices", shard: tuple[int, int] = (0, 1)) -> list[tuple[float, int] | None]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` per request.

    With ``shard=(index, count)`` only that shard's batches are scored; the other requests get ``None``."""
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    padder = _with_pad_token(tokenizer, pad_id)
    limit = _max_length(model, tokenizer)
    items = []
    for context, continuation in requests:
        ctx, cont = _split_continuation(tokenizer, context, continuation, add_special_tokens)
        if not ctx:  # the first continuation token needs something to be predicted from
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
        items.append(((ctx + cont)[-limit:], min(len(cont), limit - 1)))
    plan = batch_plan([len(ids) for ids, _ in items], batch_size, shard)
    results: list[tuple[float, int] | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    try:
        for _, index in tqdm(plan, desc=desc, disable=not show_progress, unit="batch"):
            # Right padding: positions stay 0..len-1 without position_ids.
            input_ids, attention_mask = _pad(padder, [items[i][0] for i in index], "right", device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for row, i in enumerate(index):
                ids, n_cont = items[i]
                if n_cont == 0:
                    results[i] = (0.0, 0)
                    continue
                positions = slice(len(ids) - n_cont - 1, len(ids) - 1)  # logits at t predict token t + 1
                logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
                targets = torch.tensor(ids[len(ids) - n_cont:], device=logprobs.device)
                results[i] = (float(logprobs.gather(-1, targets[:, None]).sum()), n_cont)
    finally:
        model.train(was_training)
    return results


def vllm_available() -> bool:
    """vLLM is used only when installed *and* a CUDA device exists (never installed by this project)."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_blocker() -> str | None:
    """Why vLLM must not start in this process now, or ``None``.

    The rule: vLLM never starts in a process that trains or holds GPU memory. Its ``LLM`` reserves most of a GPU
    (``gpu_memory_utilization``, 90 % by default) and brings up its own distributed state, so inside a training run
    (a ``torch.distributed`` process group is up) or next to a loaded model it would take the memory training holds.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ("a torch.distributed process group is up in this process (a training run), and vLLM would start its "
                "own engine on a GPU the run holds")
    if torch.cuda.is_initialized():
        held = {i: torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())}
        held = {i: b for i, b in held.items() if b}
        if held:
            where = ", ".join(f"{b / 2**30:.1f} GiB on cuda:{i}" for i, b in held.items())
            return f"this process already holds GPU memory ({where}: a model being trained or evaluated)"
    return None


def generate_vllm(llm, prompts: Sequence[str], max_new_tokens: int = 256, num_samples: int = 1,
                  temperature: float = 0.8, top_p: float = 0.95, stop: Sequence[str] = (),
                  seed: int | None = None) -> list[list[str]]:
    """Same contract as :func:`generate` for a ``vllm.LLM``; greedy (temperature 0) when ``num_samples == 1``."""
    from vllm import SamplingParams

    params = SamplingParams(n=num_samples, temperature=temperature if num_samples > 1 else 0.0,
                            top_p=top_p if num_samples > 1 else 1.0, max_tokens=max_new_tokens,
                            stop=list(stop) or None, seed=seed)
    outputs = llm.generate(list(prompts), params)
    return [[truncate_at_stop(o.text, stop) for o in out.outputs] for out in outputs]

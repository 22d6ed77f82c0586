"""Tiny causal LMs and a tokenizer built entirely offline.

Tests and the embedded demo need a real ``transformers`` model and tokenizer without touching a hub. These helpers
build both from a config: a byte-level BPE tokenizer trained in memory on a small corpus (so any text encodes), and
Llama-, Qwen2- or GPT-2-style models with random weights. Everything saved here loads back with the plain
``Auto*.from_pretrained`` calls a user would write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

# ChatML-style template, the same shape Qwen/SmolLM use, so conversational datasets work with SFTTrainer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response:\nThe answer is 42. #### 72",
    "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n",
    "What is 12 + 30? 12 + 30 = 42. Question: Answer: user assistant system",
    "0123456789 + - * / = ( ) [ ] { } : ; , . ! ? ' \" \\boxed{} \\frac{1}{2}",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
    "reverse sort sum count upper lower copy repeat first last list string number word letters",
]


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory (offline, deterministic).

    Special tokens: ``<|endoftext|>`` (bos/eos/pad/unk), ``<|im_start|>``, ``<|im_end|>``; a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, tokenizer=None,
                initializer_range: float = 0.02):
    """A small ``PretrainedConfig`` of the given architecture: ``llama``, ``qwen2`` or ``gpt2``.

    ``initializer_range`` above the usual 0.02 gives a random model peaked enough logits to learn from quickly
    through its frozen output head (the demo uses 0.2).
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    ids["initializer_range"] = initializer_range
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, max_position_embeddings=1024,
                           tie_word_embeddings=False, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, max_position_embeddings=1024,
                           tie_word_embeddings=True, **ids)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=1024, n_inner=intermediate_size, **ids)
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of 'llama', 'qwen2', 'gpt2'.")


def build_tiny_model(arch: str = "llama", seed: int = 0, tokenizer=None, **config_kwargs):
    """A randomly initialised causal LM (fp32) built from :func:`tiny_config`; deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    vocab = len(tokenizer) if tokenizer is not None else config_kwargs.pop("vocab_size", 512)
    config = tiny_config(arch, vocab_size=vocab, tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float()


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0, corpus: Iterable[str] | None = None,
                    **config_kwargs) -> str:
    """Build a tiny model + tokenizer and ``save_pretrained`` both into ``path`` (a normal local model dir)."""
    tokenizer = build_tokenizer(corpus)
    model = build_tiny_model(arch, seed=seed, tokenizer=tokenizer, **config_kwargs)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

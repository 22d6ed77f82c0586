"""Synthetic tasks for the quality and precision benchmarks (offline, deterministic, small enough for a CPU).

* :class:`TeacherStudentTask` — a teacher is the student's initial model with a FULL-RANK Gaussian change added to
  every block linear; the student regresses the teacher's logits on random token sequences. An adapter method can
  only match the teacher as far as its accumulated update ΔW can express that change.
* :class:`MultiTaskLM` — the bundled demo data (``recipes/demo/data``: math, code, text): a tiny Llama is first
  "pretrained" on the prompts alone (full FT, fixed budget), then fine-tuned to write the completions of the three
  tasks mixed; evaluated per task on the held-out rows (completion-only loss and teacher-forced token accuracy).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from bench._common import REPO_ROOT, block_linear_names

DEMO_DATA = os.path.join(REPO_ROOT, "recipes", "demo", "data")
TASKS = ("math", "code", "text")


# ----------------------------------------------------------------------------------------------- teacher-student
class TeacherStudentTask:
    """Regress the logits of a teacher whose block linears are ``W + ε·std(W)·G`` (G Gaussian: full rank)."""

    name = "teacher_student"

    def __init__(self, model_kwargs: dict, seed: int = 0, perturb: float = 0.5, batch: int = 8, seq: int = 32,
                 eval_sequences: int = 64, initializer_range: float = 0.05):
        from bench._common import build_llama

        self.model_kwargs, self.seed, self.batch, self.seq = model_kwargs, seed, batch, seq
        self.initializer_range = initializer_range
        self.student_state = build_llama(model_kwargs, seed=1000 + seed,
                                         initializer_range=initializer_range).state_dict()
        self.teacher = self.new_student()
        g = torch.Generator().manual_seed(2000 + seed)
        with torch.no_grad():
            for name in block_linear_names(self.teacher):
                w = self.teacher.get_submodule(name).weight
                w.add_(torch.randn(w.shape, generator=g) * (perturb * w.std()))
        self.teacher.eval().requires_grad_(False)
        self.vocab = self.teacher.config.vocab_size
        ge = torch.Generator().manual_seed(3000 + seed)
        self.eval_ids = torch.randint(0, self.vocab, (eval_sequences, seq), generator=ge)
        with torch.no_grad():
            self.eval_target = self.teacher(input_ids=self.eval_ids).logits
            student0 = self.new_student()
            self.scale = float(F.mse_loss(student0(input_ids=self.eval_ids).logits, self.eval_target))

    def new_student(self):
        from bench._common import build_llama

        model = build_llama(self.model_kwargs, seed=1000 + self.seed, initializer_range=self.initializer_range)
        model.load_state_dict(self.student_state)
        return model

    def train_batch(self, step: int, rank: int) -> dict:
        g = torch.Generator().manual_seed(10_000_019 * (self.seed + 1) + 7919 * step + rank)
        ids = torch.randint(0, self.vocab, (self.batch, self.seq), generator=g)
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits
        return {"input_ids": ids, "target": target}

    def loss(self, model, batch: dict) -> torch.Tensor:
        """MSE to the teacher's logits, divided by the initial student's eval MSE (starts near 1)."""
        return F.mse_loss(model(input_ids=batch["input_ids"]).logits, batch["target"]) / self.scale

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """``eval_loss``: relative MSE; ``agree``: share of held-out positions whose top token is the teacher's."""
        logits = model(input_ids=self.eval_ids).logits
        rel = float(F.mse_loss(logits, self.eval_target)) / self.scale
        agree = float((logits.argmax(-1) == self.eval_target.argmax(-1)).float().mean())
        return {"eval_loss": rel, "agree": agree}


# --------------------------------------------------------------------------------------------- multi-task mix LM
def load_demo_rows(split: str, tasks=TASKS, data_dir: str = DEMO_DATA) -> list[dict]:
    rows = []
    for task in tasks:
        with open(os.path.join(data_dir, f"{task}_{split}.jsonl"), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def build_demo_tokenizer(vocab_size: int = 512):
    from hdpissa_trl.testing_utils import build_tokenizer

    corpus = [r["prompt"] + r["completion"] for r in load_demo_rows("train")][::4]
    return build_tokenizer(corpus, vocab_size=vocab_size)


MAX_LEN = 40  # every demo row fits (longest: 39 tokens with the 512-token BPE); fixed shapes keep CPU kernels warm


def encode_rows(tokenizer, rows: list[dict], max_len: int = MAX_LEN) -> list[tuple[list[int], int, str]]:
    """``(ids, prompt_length, task)`` per row; ids = prompt + completion + eos, truncated to ``max_len``."""
    out = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(((p + c)[:max_len], len(p), r["task"]))
    return out


def collate(examples, pad_id: int, prompt_loss: bool = False, pad_to: int = MAX_LEN) -> dict:
    """Right-pad to ``pad_to`` tokens (a fixed shape: oneDNN re-plans its kernels for every new shape, which made
    variable-length batches several times slower on CPU); labels are -100 on padding (and on the prompt)."""
    n = max(pad_to, *(len(ids) for ids, _, _ in examples))
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, plen, _) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        start = 0 if prompt_loss else plen
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain_on_prompts(model, tokenizer, steps: int = 150, batch: int = 16, lr: float = 2e-3, seed: int = 0):
    """Full-FT 'pretraining' on the training PROMPTS only (so fine-tuning still has everything to learn about the
    completions); returns the model."""
    rows = load_demo_rows("train")
    prompts = [(ids[:plen], 0, t) for ids, plen, t in encode_rows(tokenizer, rows)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(prompts), (batch,), generator=g).tolist()
        b = collate([prompts[i] for i in idx], tokenizer.pad_token_id, prompt_loss=True)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


class MultiTaskLM:
    """Fine-tune a prompt-pretrained tiny Llama on the math + code + text completions (mixed uniformly)."""

    name = "multitask"

    def __init__(self, base_dir: str, seed: int = 0, batch: int = 8, max_len: int = MAX_LEN):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir, self.seed, self.batch = base_dir, seed, batch
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.model_cls = AutoModelForCausalLM
        self.train = encode_rows(self.tokenizer, load_demo_rows("train"), max_len)
        test = encode_rows(self.tokenizer, load_demo_rows("test"), max_len)
        self.test = {t: [e for e in test if e[2] == t] for t in TASKS}
        self.pad = self.tokenizer.pad_token_id

    def new_student(self):
        return self.model_cls.from_pretrained(self.base_dir, dtype=torch.float32)

    def train_batch(self, step: int, rank: int) -> dict:
        g = torch.Generator().manual_seed(10_000_019 * (self.seed + 1) + 7919 * step + rank)
        idx = torch.randint(0, len(self.train), (self.batch,), generator=g).tolist()
        return collate([self.train[i] for i in idx], self.pad)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        out = {}
        for task, rows in self.test.items():
            b = collate(rows, self.pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            mask = labels != -100
            lp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1),
                                 reduction="none").view_as(labels)
            out[f"{task}_loss"] = float((lp * mask).sum() / mask.sum())
            hit = (logits.argmax(-1) == labels) & mask
            out[f"{task}_token_acc"] = float(hit.sum() / mask.sum())
            out[f"{task}_exact"] = float((hit.sum(1) == mask.sum(1)).float().mean())  # greedy writes it exactly
        out["eval_loss"] = sum(out[f"{t}_loss"] for t in TASKS) / len(TASKS)
        out["token_acc"] = sum(out[f"{t}_token_acc"] for t in TASKS) / len(TASKS)
        out["exact"] = sum(out[f"{t}_exact"] for t in TASKS) / len(TASKS)
        return out


def prepare_multitask_base(out_dir: str, model_kwargs: dict, pretrain_steps: int = 150, seed: int = 0) -> str:
    """Build the tokenizer and the prompt-pretrained base model once; ``save_pretrained`` both into ``out_dir``."""
    from bench._common import build_llama

    tok = build_demo_tokenizer(model_kwargs.get("vocab_size", 512))
    kw = dict(model_kwargs, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = build_llama(kw, seed=seed, initializer_range=0.05)
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    pretrain_on_prompts(model, tok, steps=pretrain_steps, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir

"""Build offline stand-ins for the hub repos TRL's SFT, DPO and GRPO tests load by name.

Extended copy of the shared runner's setup_standins.py (same approach): adds the tiny models the DPO/GRPO test
modules need beyond the SFT ones (Llama-3.2, Mistral-0.2, Gemma-2 causal LMs; Qwen2.5 / Qwen3 / Llama-3.2 sequence
classification reward models). The sequence-classification scripts call `AutoConfig.from_pretrained(<real id>)`:
that returns the architecture's config class with the real model's vocab size and special ids of the stand-in
tokenizer (the scripts override every size that matters: hidden, heads, layers, intermediate).

Idempotent: each artefact is skipped when its marker file already exists (delete PEER_TRL_HOME to rebuild).

* Datasets: TRL's own generator scripts (upstream/scripts/generate_*_dataset.py, unmodified) are executed with
  `DatasetDict.push_to_hub` redirected to a local parquet export under $PEER_TRL_HOME/datasets/<repo>/<config>/.
  The pytest plugin maps `datasets.load_dataset(repo, config, ...)` to those files.
* Tiny models: TRL's own tiny-model scripts (upstream/scripts/generate_tiny_models/..., unmodified) are executed with
  - `AutoTokenizer.from_pretrained(<real model id>)` -> a stand-in tokenizer (SmolLM2 BPE vocab from
    $PEER_TRL_BASE_TOKENIZER + the real model's chat template as shipped in trl/chat_templates + its special tokens),
  - `GenerationConfig.from_pretrained` -> default GenerationConfig (with the stand-in eos/pad/bos ids),
  - version/dtype/config-diff checks -> no-ops,
  - `push_to_hub` -> write a snapshot into a private HF hub cache ($HF_HOME/hub/models--org--name/...), so
    `from_pretrained("trl-internal-testing/tiny-...")` resolves with HF_HUB_OFFLINE=1.
  Architecture classes and config values are therefore exactly upstream's; only the tokenizer vocab differs.
"""

import hashlib
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = Path(os.environ["PEER_TRL_SCRIPTS"])  # TRL's generate_tiny_models scripts (run.sh sets it)
PEER_HOME = Path(os.environ.get("PEER_TRL_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "peer_trl")))
HF_HOME = Path(os.environ.setdefault("HF_HOME", str(PEER_HOME / "hf_home")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BASE_TOKENIZER = os.environ["PEER_TRL_BASE_TOKENIZER"]  # a directory with SmolLM2's tokenizer (run.sh checks it)
DATASETS_DIR = PEER_HOME / "datasets"
HUB_DIR = HF_HOME / "hub"

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
_load_base_tokenizer = AutoTokenizer.from_pretrained  # bound before any patching

# real model id -> (chat template file in trl/chat_templates or None=keep/none, eos, pad, bos)
TOKENIZER_SPECS = {
    "Qwen/Qwen2.5-32B-Instruct": ("qwen2_5.jinja", "<|im_end|>", "<|endoftext|>", None),
    "Qwen/Qwen3-8B": ("qwen3.jinja", "<|im_end|>", "<|endoftext|>", None),
    "Qwen/Qwen3-30B-A3B": ("qwen3.jinja", "<|im_end|>", "<|endoftext|>", None),
    "Qwen/Qwen3-4B": ("qwen3.jinja", "<|im_end|>", "<|endoftext|>", None),
    "openai/gpt-oss-20b": ("gptoss.jinja", "<|return|>", "<|endoftext|>", None),
    "zai-org/GLM-4.5": ("glm4moe.jinja", "<|endoftext|>", "<|endoftext|>", None),
    "CohereLabs/tiny-aya-earth": ("cohere2.jinja", "<|END_OF_TURN_TOKEN|>", "<PAD>", "<BOS_TOKEN>"),
    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ("nemotron_3_nano.jinja", "<|im_end|>", "<unk>", None),
    "allenai/Olmo-3-7B-Think": ("__base__", "<|im_end|>", "<|pad|>", None),  # no Olmo template in trl
    "LiquidAI/LFM2-1.2B": ("lfm2.jinja", "<|im_end|>", "<|pad|>", "<|startoftext|>"),
    "LiquidAI/LFM2.5-230M": ("lfm2_2_5.jinja", "<|im_end|>", "<|pad|>", "<|startoftext|>"),
    "EleutherAI/pythia-14m": (None, "<|endoftext|>", None, None),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama3_2.jinja", "<|eot_id|>", None, "<|begin_of_text|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": (None, "</s>", None, "<s>"),
    "google/gemma-2-2b-it": (None, "<end_of_turn>", "<pad>", "<bos>"),
}

# scripts that size the embedding with len(tokenizer.vocab) but hard-code special ids of the real tokenizer
MIN_VOCAB = {"allenai/Olmo-3-7B-Think": 100352}


class _TokProxy:
    """Delegates to the stand-in tokenizer but reports a larger `vocab` (only its len() is used by the scripts)."""

    def __init__(self, tok, min_vocab):
        self._wrapped, self._min_vocab = tok, min_vocab

    @property
    def vocab(self):
        v = self._wrapped.get_vocab()
        return range(max(len(v), self._min_vocab))

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


# tiny-model generator scripts (module under upstream/scripts/generate_tiny_models/for_causal_lm) to build
TINY_MODEL_SCRIPTS = [
    "qwen2_for_causal_lm_2_5",
    "qwen3_for_causal_lm",
    "qwen3_moe_for_causal_lm",
    "cohere2_for_causal_lm",
    "glm4_moe_for_causal_lm",
    "gpt_oss_for_causal_lm",
    "nemotron_3_nano_for_causal_lm",
    "olmo3_for_causal_lm",
    "lfm2_for_causal_lm",
    "lfm2_for_causal_lm_2_5",
    "gpt_neox_for_causal_lm",
    "remote_for_causal_lm",
    # DPO / GRPO modules
    "llama_for_causal_lm_3_2",
    "mistral_for_causal_lm_0_2",
    "gemma2_for_causal_lm",
    "for_sequence_classification.qwen2_for_sequence_classification_2_5",
    "for_sequence_classification.qwen3_for_sequence_classification",
    "for_sequence_classification.llama_for_sequence_classification_3_2",
]
# real model id -> (config class name, real vocab size) for AutoConfig.from_pretrained in the reward-model scripts
CONFIG_SPECS = {
    "Qwen/Qwen2.5-32B-Instruct": ("Qwen2Config", 152064),
    "Qwen/Qwen3-4B": ("Qwen3Config", 151936),
    "meta-llama/Llama-3.2-1B-Instruct": ("LlamaConfig", 128256),
}
# tokenizer-only repos (e.g. used via `chat_template_path=`)
TOKENIZER_ONLY_REPOS = {"Qwen/Qwen3-4B": "Qwen/Qwen3-4B"}  # tokenizer + tiny config.json, no weights

DATASET_SCRIPTS = {
    "generate_zen_dataset": "trl-internal-testing/zen",
    "generate_toolcall_dataset": "trl-internal-testing/toolcall",
    "generate_harmony_dataset": "trl-internal-testing/harmony",
}

SPECIAL_RE = re.compile(r"<\|[^|<>\s'\"{}]{1,40}\|>|<(?:BOS_TOKEN|PAD|EOS_TOKEN)>|</?(?:think|tool_call|tool_response)>")


def make_tokenizer(model_id):
    template_file, eos, pad, bos = TOKENIZER_SPECS[model_id]
    tok = _load_base_tokenizer(BASE_TOKENIZER)
    template = None
    if template_file == "__base__":
        template = tok.chat_template
    elif template_file is not None:
        template = (TRL_TEMPLATES / template_file).read_text(encoding="utf-8")
    specials = set(SPECIAL_RE.findall(template or ""))
    specials |= {t for t in (eos, pad, bos) if t}
    vocab = tok.get_vocab()
    new = sorted(t for t in specials if t not in vocab)
    if new:
        tok.add_tokens(new, special_tokens=True)
    tok.eos_token = eos
    if pad:
        tok.pad_token = pad
    if bos:
        tok.bos_token = bos
    tok.chat_template = template
    tok.name_or_path = model_id
    return tok


def _snapshot_dir(repo_id):
    repo_dir = HUB_DIR / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(("peer-trl-standin:" + repo_id).encode()).hexdigest()
    return repo_dir, commit


def write_hub_repo(repo_id, save_fn):
    """Write a repo snapshot into the HF hub cache layout (snapshots/<commit>/ + refs/main)."""
    repo_dir, commit = _snapshot_dir(repo_id)
    snap = repo_dir / "snapshots" / commit
    if snap.exists():
        shutil.rmtree(snap)
    snap.mkdir(parents=True)
    save_fn(str(snap))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (snap / ".peer_trl_done").write_text("ok")
    return snap


def hub_repo_done(repo_id):
    repo_dir, commit = _snapshot_dir(repo_id)
    return (repo_dir / "snapshots" / commit / ".peer_trl_done").exists()


def build_datasets():
    import datasets

    sys.path.insert(0, str(SCRIPTS))
    current = {}

    def fake_push_to_hub(self, repo_id, config_name="default", **kwargs):
        out = DATASETS_DIR / repo_id / config_name
        out.mkdir(parents=True, exist_ok=True)
        splits = self.items() if isinstance(self, datasets.DatasetDict) else [("train", self)]
        for split, ds in splits:
            if repo_id.endswith("/toolcall") and "tools" in ds.column_names:
                # The hub copy stores `tools` as JSON strings (test_train_toolcall_data_as_json json.loads() it);
                # the current generator keeps python objects, so serialise like the hub files.
                ds = ds.map(lambda ex: {"tools_json": json.dumps(ex["tools"])}, remove_columns=["tools"])
                ds = ds.rename_column("tools_json", "tools")
            ds.to_parquet(str(out / f"{split}.parquet"))
        current.setdefault(repo_id, []).append(config_name)

    orig_dd, orig_ds = datasets.DatasetDict.push_to_hub, datasets.Dataset.push_to_hub
    datasets.DatasetDict.push_to_hub = fake_push_to_hub
    datasets.Dataset.push_to_hub = fake_push_to_hub
    try:
        for script, repo_id in DATASET_SCRIPTS.items():
            marker = DATASETS_DIR / repo_id / ".peer_trl_done"
            if marker.exists():
                continue
            mod = importlib.import_module(script)
            # generator defaults: test_size=0.1 (see ScriptArguments in each script)
            mod.main(test_size=0.1, push_to_hub=True, repo_id=repo_id)
            marker.write_text(json.dumps(current.get(repo_id, [])))
            print(f"[peer_trl] dataset {repo_id}: {current.get(repo_id)}")
    finally:
        datasets.DatasetDict.push_to_hub, datasets.Dataset.push_to_hub = orig_dd, orig_ds


def build_models():
    sys.path.insert(0, str(SCRIPTS))
    common = importlib.import_module("generate_tiny_models._common")
    built = {}

    def fake_push_to_hub(model, tokenizer, generation_config, prefix=None, suffix=None, create_pr=None):
        tokenizer = getattr(tokenizer, "_wrapped", tokenizer)
        name = model.__class__.__name__
        if prefix is not None:
            name = f"{prefix}-{name}"
        repo_id = f"{common.ORGANIZATION}/{name}" + (f"-{suffix}" if suffix is not None else "")

        def save(d):
            model.save_pretrained(d)
            if tokenizer is not None:
                tokenizer.save_pretrained(d)
            if generation_config is not None:
                generation_config.save_pretrained(d)

        write_hub_repo(repo_id, save)
        built["repo_id"] = repo_id

    common.push_to_hub = fake_push_to_hub
    common.check_transformers_version = lambda *a, **k: None
    common.check_dtype_pattern = lambda *a, **k: None
    common.print_config_diff = lambda *a, **k: None
    common.smoke_test = lambda *a, **k: None

    orig_tok = transformers.AutoTokenizer.__dict__["from_pretrained"]
    orig_gen = transformers.GenerationConfig.__dict__["from_pretrained"]
    orig_cfg = transformers.AutoConfig.__dict__["from_pretrained"]
    state = {}

    def fake_tok(model_id, *a, **k):
        tok = make_tokenizer(model_id)
        state["tok"] = tok
        if model_id in MIN_VOCAB:
            return _TokProxy(tok, MIN_VOCAB[model_id])
        return tok

    def fake_gen(model_id, *a, **k):
        tok = state.get("tok")
        kw = {}
        if tok is not None:
            kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        return GenerationConfig(**{k2: v for k2, v in kw.items() if v is not None})

    # the scripts size the embedding with `len(tokenizer.vocab)` or a hard-coded real vocab size; both are >= the
    # stand-in tokenizer's size, so every stand-in token id is valid.
    transformers.AutoTokenizer.from_pretrained = staticmethod(fake_tok)
    transformers.GenerationConfig.from_pretrained = staticmethod(fake_gen)

    real_cfg = transformers.AutoConfig.from_pretrained  # bound, for every id that is not a stand-in

    def fake_cfg(model_id, *a, **k):
        if model_id not in CONFIG_SPECS:
            return real_cfg(model_id, *a, **k)
        cls_name, vocab = CONFIG_SPECS[model_id]
        tok = state.get("tok")
        ids = {}
        if tok is not None:
            ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        return getattr(transformers, cls_name)(vocab_size=vocab, **{**ids, **k})

    transformers.AutoConfig.from_pretrained = staticmethod(fake_cfg)
    sys.argv = [sys.argv[0]]  # push_to_hub's _parse_args() parses sys.argv
    try:
        for script in TINY_MODEL_SCRIPTS:
            marker = PEER_HOME / "models_done" / script
            if marker.exists():
                continue
            torch.manual_seed(0)
            built.clear()
            state.clear()
            sub = script if "." in script else f"for_causal_lm.{script}"
            importlib.import_module(f"generate_tiny_models.{sub}")
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(built.get("repo_id", "?"))
            print(f"[peer_trl] model {built.get('repo_id')} <- {script}")
        for repo_id, model_id in TOKENIZER_ONLY_REPOS.items():
            if hub_repo_done(repo_id):
                continue
            tok = make_tokenizer(model_id)

            def save(d, tok=tok):
                tok.save_pretrained(d)
                # TRL's chat_template_path=<hub id> also reads the repo's config.json
                transformers.Qwen3Config(
                    vocab_size=len(tok), hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, intermediate_size=32,
                ).save_pretrained(d)

            write_hub_repo(repo_id, save)
            print(f"[peer_trl] tokenizer {repo_id}")
    finally:
        transformers.AutoTokenizer.from_pretrained = orig_tok
        transformers.GenerationConfig.from_pretrained = orig_gen
        transformers.AutoConfig.from_pretrained = orig_cfg


if __name__ == "__main__":
    PEER_HOME.mkdir(parents=True, exist_ok=True)
    build_datasets()
    build_models()
    print("[peer_trl] stand-ins ready under", PEER_HOME)

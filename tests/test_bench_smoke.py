"""Smoke tests of the benchmark scripts (bench/): each core function in a tiny mode, asserting values, never times.

They keep the scripts working; the numbers in BENCHMARKS.md come from the full runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import communication, init_svd, precision, quality, rl_step, sharded, step_speed
from bench._common import build_llama, linear_weights, setup_method
from bench._tasks import TeacherStudentTask, prepare_multitask_base
from hdpissa_trl.launch import REPO_ROOT, child_env, free_port


@pytest.mark.parametrize("script", ["communication", "fold_speed", "gpu_check", "init_svd", "precision", "quality",
                                    "real_model", "rl_step", "sharded", "step_speed", "sweep"])
def test_scripts_run_as_modules(tmp_path, script):
    """``python -m bench.X`` is how BENCHMARKS.md runs them: it parses its command line from any directory (the
    launch helpers put the checkout on PYTHONPATH), without a sys.path preamble in the script."""
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout and "--" in proc.stdout
    assert f"bench.{script}" in open(f"{REPO_ROOT}/BENCHMARKS.md", encoding="utf-8").read()


def test_step_speed_measures_every_method_in_one_process():
    res = step_speed.measure_methods(list(step_speed.ALL_METHODS), preset="tiny", r=2, alpha=2.0, batch=1, seq=8,
                                     accum=2, rounds=1, steps=1)
    assert set(res["records"]) == set(step_speed.ALL_METHODS)
    for recs in res["records"].values():
        assert len(recs) == 1
        assert set(step_speed.TIME_KEYS) <= set(recs[0])
        assert recs[0]["step"] >= recs[0]["fwd_bwd"] > 0
        assert torch.isfinite(torch.tensor(recs[0]["loss"]))
    mem = res["memory"]
    # Trainable state: full FT holds grads + 2 Adam moments of every parameter; adapters far less.
    assert mem["full"]["optimizer_state"] > 10 * mem["lora"]["optimizer_state"]
    # The official-style forward keeps the dense W + 1e-16·BA of every layer for the backward.
    assert mem["official"]["saved_activations"] > mem["hdpissa"]["saved_activations"]
    s = step_speed.summarize(res["records"], accum=2, paper_accum=64)
    assert {"hdpissa_over_lora_step", "official_over_hdpissa_step", "hdpissa_fold_fraction_at_paper_accum"} <= set(
        s["ratios"])
    assert 0 < s["ratios"]["hdpissa_fold_fraction_at_paper_accum"] < s["ratios"]["hdpissa_fold_fraction_measured"]


def test_step_speed_global_slice_gradients_step_like_local_on_one_device():
    """``hdpissa_global`` runs the slice-gradient reduce before the optimizer (``after_backward``): on one device the
    reduce hands slice 0 its own gradient, so one step gives the same W as plain HD-PiSSA; its every-slice buffers
    count as gradient memory."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    weights, setups = {}, {}
    for name in ("hdpissa", "hdpissa_global"):
        setup = setup_method(name, build_llama("tiny", seed=0), r=2, alpha=4.0)
        assert (setup.after_backward is not None) == (name == "hdpissa_global")
        res = step_speed.train_step(setup, torch.optim.SGD(setup.params, lr=0.5), [ids], "cpu")
        assert res["step"] >= res["fwd_bwd"] > 0
        weights[name], setups[name] = linear_weights(setup), setup
    w0 = linear_weights(setup_method("full", build_llama("tiny", seed=0), r=2, alpha=4.0))
    for key, w in weights["hdpissa"].items():
        assert (w - w0[key]).abs().max() > 0
        torch.testing.assert_close(weights["hdpissa_global"][key], w, rtol=1e-5, atol=1e-7)
    mem = {name: step_speed.accounted_memory(s, torch.optim.SGD(s.params, lr=0.1), ids) for name, s in setups.items()}
    buffers = sum(t.numel() * 4 for layer in setups["hdpissa_global"].engine.layers for t in layer.slice_grads)
    assert mem["hdpissa_global"]["grads"] == mem["hdpissa"]["grads"] + buffers > mem["hdpissa"]["grads"]


def test_official_style_step_equals_hdpissa_step():
    """The comparison is apples to apples: same gradients (after the 1e16 rescale) and the same folded W."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    weights = {}
    for name in ("hdpissa", "official"):
        setup = setup_method(name, build_llama("tiny", seed=0), r=2, alpha=4.0)
        opt = torch.optim.SGD(setup.params, lr=0.5)
        setup.model(input_ids=ids, labels=ids).loss.backward()
        if setup.after_backward is not None:
            setup.after_backward()
        opt.step()
        setup.after_step()
        weights[name] = linear_weights(setup)
    assert weights["hdpissa"].keys() == weights["official"].keys()
    w0 = linear_weights(setup_method("full", build_llama("tiny", seed=0), r=2, alpha=4.0))
    for key, w in weights["hdpissa"].items():
        delta_h, delta_o = w - w0[key], weights["official"][key] - w0[key]
        assert delta_h.abs().max() > 0
        torch.testing.assert_close(delta_o, delta_h, rtol=1e-3, atol=1e-6)


def test_communication_formula():
    shapes = [(64, 32), (32, 64)]
    f = communication.formula(shapes, r=4, K=8)
    P = 4 * 4 * (96 + 96)
    assert f["per_device_delta_bytes"] == P
    assert f["hdpissa"] == {"collectives": 1, "bytes_contributed": P, "bytes_received": 7 * P}
    assert f["official"] == {"collectives": 8, "bytes_contributed": 2 * P, "bytes_received": 14 * P}
    assert len(communication.LLAMA31_8B_SHAPES) == 224


@pytest.mark.slow
def test_communication_formula_matches_real_gloo_processes():
    measured = communication.run_measured(2, "tiny", r=2, steps=1, timeout=240)
    checks = communication.check_formula(measured, r=2)
    assert all(eq for (_, _, eq) in checks.values()), checks
    assert measured["hdpissa"]["calls"] == {"all_gather_single": 1} or measured["hdpissa"]["calls"] == {
        "all_gather_into_tensor": 1}
    assert measured["official"]["collectives"] == 4 * 14  # tiny preset: 2 blocks × 7 linears
    assert measured["official"]["bytes_received"] == 2 * measured["hdpissa"]["bytes_received"]


def test_sharded_projection_formulas():
    """The fold's bytes per rank under both schemes and the per-rank memory items, against sums written out here."""
    shapes, r, K = [(6, 4), (4, 6)], 2, 2
    fb = sharded.fold_bytes(shapes, r, K)
    assert fb["all_gather"] == 4 * (K - 1) * r * (6 + 4 + 4 + 6)
    assert fb["all_to_all"] == 4 * (K - 1) * (r * (4 + 6) + r * (6 + 4) // K) < fb["all_gather"]
    rep = sharded.memory_per_rank(shapes, other_params=10, r=r, K=K, sharded=False)
    shd = sharded.memory_per_rank(shapes, other_params=10, r=r, K=K, sharded=True)
    assert rep["W (bf16)"] == 2 * (48 + 10) and shd["W (bf16)"] == rep["W (bf16)"] / K
    assert shd["fp32 master of adapted W"] == 4 * 48 / K
    assert shd["A0_all (K·r × n, fp32, every rank)"] == rep["A0_all (K·r × n, fp32, every rank)"] == 4 * K * r * 10
    proj = sharded.projection()
    assert proj["K"] == 64 and proj["memory_sharded"]["total"] < proj["memory_replicated"]["total"] / 10
    assert proj["fold_bytes_received"]["all_to_all"] < proj["fold_bytes_received"]["all_gather"]
    # The fold's receive buffer: capped by default, K/(K-1) times the bytes received without the cap.
    fold = proj["fold_transient_sharded"]
    for scheme in ("all_to_all", "all_gather"):
        assert fold[f"{scheme}, default cap"]["receive"] <= proj["receive_cap_bytes"]
        assert fold[f"{scheme}, no cap"]["receive"] == proj["fold_bytes_received"][scheme] * 64 // 63


def test_init_svd_agreement():
    res = init_svd.run(sizes=(96,), ks=(8,), alphas=(1.0,), reps=1, r=4)
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == set(init_svd.METHODS)
    assert rows["exact"]["mean_cos2_right"] > 0.9999
    assert rows["exact"]["rel_frob_error_vs_optimal"] == pytest.approx(1.0, abs=1e-4)
    assert rows["rand n_iter=4"]["mean_cos2_right"] > 0.9
    for row in rows.values():
        assert 0.0 <= row["min_cos2_right"] <= row["mean_cos2_right"] <= 1.0 + 1e-6
        assert row["rel_frob_error_vs_optimal"] >= 1.0 - 1e-4


def test_precision_memory_and_tracking(tmp_path):
    base = prepare_multitask_base(str(tmp_path / "base"), dict(quality.QUICK_MODEL, vocab_size=512),
                                  pretrain_steps=2)
    res = precision.run(base, lrs=(1e-3,), steps=3, r=2, eval_every=3)
    per_entry = {label: m["bytes_per_entry"] for label, m in res["memory"].items()}
    assert per_entry == {"fp32 weights (reference)": 4.0, "bf16 + fp32 master": 6.0, "bf16 + Kahan": 4.0,
                         "bf16 + stochastic rounding": 2.0, "plain bf16": 2.0}
    runs = res["runs"]["0.001"]
    assert runs[precision.REF]["deltaW_rel_error_vs_ref"] == 0.0
    for v in runs.values():
        assert v["deltaW_norm_ratio_vs_ref"] > 0 and torch.isfinite(torch.tensor(v["final_eval_loss"]))
    assert precision.adapted_numel(dict(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                                        num_kv_heads=1)) == 2 * (2 * 64 + 2 * 32 + 3 * 128)


def test_quality_train_run_ranks():
    task = TeacherStudentTask(quality.QUICK_MODEL, seed=0, batch=2, seq=8, eval_sequences=4)
    r, out = 2, {}
    for method in quality.METHODS:
        out[method] = quality.train_run(task, method, r=r, alpha=2.0, lr=1e-2, steps=3, eval_every=3, seed=0,
                                        keep_spectra=True)
    for rec in out.values():
        assert rec["curve"][0][0] == 0 and rec["curve"][-1][0] == 3
        assert rec["final"]["eval_loss"] > 0
        for lay in rec["layers"].values():
            assert len(lay["singular_values"]) == min(lay["shape"])
    assert max(lay["numerical_rank"] for lay in out["lora"]["layers"].values()) <= r
    assert max(lay["numerical_rank"] for lay in out["pissa"]["layers"].values()) <= 2 * r
    assert min(lay["numerical_rank"] for lay in out["full"]["layers"].values()) > 2 * r
    s = quality.summarize([dict(rec, task="teacher_student", K=1) for rec in out.values()])
    assert [row["method"] for row in s] == list(quality.METHODS)


@pytest.fixture
def single_process_group_env(monkeypatch):
    """Environment torchrun would give a one-process job, so the scripts' worker functions run in this process;
    restores the global torch settings the workers change."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_worker_paths_reports_and_figures(tmp_path, single_process_group_env):
    """The torchrun worker functions (in a one-process gloo group), then the launchers' report and plot code."""
    import argparse

    from bench._common import env_info

    info = env_info(nproc=1, backend="gloo")
    # quality: worker -> records -> summary, tables, both figures
    cfg = {"model": quality.QUICK_MODEL, "tasks": ["teacher_student"], "methods": ["hdpissa", "lora"], "seeds": [0],
           "steps": 2, "eval_every": 1, "r": 2, "alpha": 2.0, "batch": 2, "seq": 8, "lr": quality.lr_table([]),
           "out": str(tmp_path / "q.json")}
    quality.worker(cfg)
    records = json.loads((tmp_path / "q.json").read_text())
    assert [(r["K"], r["method"], len(r["curve"])) for r in records] == [(1, "hdpissa", 3), (1, "lora", 3)]
    quality.report(quality.summarize(records), info, cfg)
    quality.plot_curves(records, info, cfg, str(tmp_path))
    quality.plot_spectra(records, info, cfg, str(tmp_path))
    assert (tmp_path / "quality_loss_curves.png").stat().st_size > 0
    assert (tmp_path / "quality_update_spectrum.png").stat().st_size > 0
    # step_speed: worker (timing run) -> summary, table, figure
    args = step_speed.build_parser().parse_args(["--preset", "tiny", "--r", "2", "--batch", "1", "--seq", "8",
                                                 "--rounds", "1", "--steps", "1", "--methods", "hdpissa,lora,official"])
    wargs = argparse.Namespace(**vars(args), memory_only=None, out=str(tmp_path / "s.json"))
    step_speed.worker(wargs)
    raw = json.loads((tmp_path / "s.json").read_text())
    run = {"env": info, "records": raw["records"], "memory": raw["memory"],
           "summary": step_speed.summarize(raw["records"], 1, 64)}
    assert raw["hdpissa_update_rank_bound"] == 2 * 1 * 2
    step_speed.report({"runs": {"1": run}}, args)
    step_speed.plot({"runs": {"1": run}}, args, str(tmp_path))
    assert (tmp_path / "step_speed.png").stat().st_size > 0


def test_real_model_heldout_loss_and_paired_table(tmp_path):
    """The real-model driver's held-out loss = token-weighted CE of the completion tokens, computed another way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import real_model
    from hdpissa_trl.testing_utils import save_tiny_model

    model_dir = tmp_path / "m"
    save_tiny_model(model_dir, seed=3)
    rows = [{"prompt": "add 2 and 3", "completion": "5"}, {"prompt": "name a colour", "completion": "blue sky"},
            {"prompt": "count", "completion": "one two three"}]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = real_model.heldout_loss(str(model_dir), [f"t={data}"], limit=2, cache=str(tmp_path / "c.json"))

    # Reference: per row, the model's own mean loss over the completion labels, weighted by their token count.
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for r in rows[:2]:
        user = [{"role": "user", "content": r["prompt"]}]
        p_ids = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
        ids = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": r["completion"]}], tokenize=False),
                  add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(p_ids) + ids[len(p_ids):]])
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += model(torch.tensor([ids]), labels=labels).loss.item() * n
        count += n
    assert count > 2 and got["t"] == pytest.approx(total / count, rel=1e-5)
    # Cached by (tasks, limit): a different limit recomputes.
    assert real_model.heldout_loss(str(model_dir), [f"t={data}"], limit=2, cache=str(tmp_path / "c.json")) == got
    assert real_model.heldout_loss(str(model_dir), [f"t={data}"], limit=3, cache=str(tmp_path / "c.json")) != got

    recs = [{"label": lab, "seed": s, "losses": [(1, 9.0), (2, base + d)], "heldout": {"t": base + 2 * d}}
            for lab, d in (("pissa2", 0.0), ("hdpissa2", -0.1), ("lora2", 0.3)) for s, base in ((0, 1.0), (1, 2.0))]
    recs[2]["heldout"]["t"] = 1.0 + 0.05  # hdpissa2 seed 0: above PiSSA on held-out loss
    md = real_model.paired_table(recs, "pissa2", ["t"])
    hd = next(line for line in md.splitlines() if line.startswith("| HD-PiSSA K=2"))
    assert "-0.100 ± 0.000 (lower in 2/2)" in hd and "-0.075 ± 0.177 (lower in 1/2)" in hd
    assert "+0.300 ± 0.000 (lower in 0/2)" in md and "PiSSA (DDP" not in md.split("\n", 2)[2]


def test_rl_step_counts_the_reference_copy_and_summarizes_against_lora(tmp_path):
    """One process, tiny model, one step per configuration: the memory count sees the frozen reference copy of
    HD-PiSSA (and none with precomputed log-probs or LoRA's adapter-disabled reference)."""
    from hdpissa_trl.testing_utils import save_tiny_model

    settings = dict(model_dir=save_tiny_model(tmp_path / "m", arch="llama"), output_dir=str(tmp_path / "out"),
                    steps=1, batch=2, r=2, max_completion_length=4)
    mem = {}
    for label, method, extra in rl_step.CONFIGS["dpo"][:3]:
        trainer = rl_step.build_trainer("dpo", method, extra, settings)
        trainer.train()
        mem[label] = rl_step.memory_breakdown(trainer)
    from transformers import AutoModelForCausalLM

    pre, copy, lora = (mem[label] for label, _, _ in rl_step.CONFIGS["dpo"][:3])
    assert pre["reference_model"] == 0 == lora["reference_model"]
    start = AutoModelForCausalLM.from_pretrained(settings["model_dir"])
    assert copy["reference_model"] == sum(p.numel() * p.element_size() for p in start.parameters())
    assert 2 * pre["trainable"] <= pre["optimizer_state"] < 2 * pre["trainable"] + 4096  # Adam: two moments (+ step)
    records = {"dpo": {"PEFT LoRA, x": {"step_s": [2.0, 2.0], "peak": [1.0], "memory": lora},
                       "HD-PiSSA, y": {"step_s": [1.0, 3.0, 1.0], "peak": [3.0, 2.0], "memory": pre}}}
    out = rl_step.summarize(records)["dpo"]
    assert out["HD-PiSSA, y"]["x_lora"] == 0.5 and out["HD-PiSSA, y"]["peak_rss_increase"] == 3.0


def test_fold_speed_counts_the_folds_operators_at_small_shapes():
    """bench.fold_speed at 1/16 of the 8B widths, one precision mode: the same bits from one state twice, and the
    operator count of the replicated fold (5 per layer with an fp32 W, plus the two multi-tensor resets)."""
    from bench import fold_speed

    rec = fold_speed.measure_mode(fold_speed.BLOCK_SHAPES["small"], 8, 2, "fp32 W", "cpu")
    assert rec["same_checksums_twice"] and rec["layers"] == 7 and rec["fold_matmul"] == "ieee"
    assert rec["fold"]["ops"] == 5 * 7 + 2 and rec["fold"]["ms"] > 0
    assert rec["checksum"]["ops"] > 0
    eff = fold_speed.tf32_effect(64, 96, 2, 4)
    assert eff["ieee"]["update_rel_error"] < 1e-6 < 2**-12 < eff["tf32"]["update_rel_error"] < 2**-9


def _write_wheel(directory, name: str, version: str = "1.0") -> str:
    """A minimal pure-Python wheel of a one-module package ``name`` (what pip needs: the module, METADATA, WHEEL,
    RECORD)."""
    import zipfile

    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


def test_gpu_check_installs_only_missing_modules_from_the_wheel_folder(tmp_path, monkeypatch):
    """What the GPU machine does without a registry: a module the environment lacks is installed from the carried
    wheel into the check's own site folder (never over the environment's packages) and becomes importable; a module
    that is there is left alone; one with no wheel is reported still missing."""
    from bench import gpu_check

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _write_wheel(str(wheels), "hdpissa_probe_pkg")
    monkeypatch.setattr(gpu_check, "EXTRA_PACKAGES", {"hdpissa_probe_pkg": "hdpissa-probe-pkg", "torch": "torch",
                                                      "hdpissa_no_wheel_pkg": "hdpissa-no-wheel-pkg"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    res = gpu_check.install_missing(str(wheels), str(site))
    assert res["missing"] == ["hdpissa_probe_pkg", "hdpissa_no_wheel_pkg"]
    assert res["installed"] == ["hdpissa_probe_pkg-1.0-py3-none-any.whl"]
    assert res["still_missing"] == ["hdpissa_no_wheel_pkg"]
    assert (site / "hdpissa_probe_pkg.py").exists() and not (site / "torch").exists()
    import importlib

    assert importlib.import_module("hdpissa_probe_pkg").VALUE == 42
    sys.modules.pop("hdpissa_probe_pkg", None)


@pytest.mark.slow
def test_gpu_check_cpu_quick_runs_every_section(tmp_path):
    """``python -m bench.gpu_check --device cpu --quick``, the command CI runs so the GPU check cannot rot: every
    section runs and its JSON holds the values each check stands for."""
    from bench import gpu_check

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--json", str(out),
                           "--work_dir", str(tmp_path / "work")], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    sec = res["sections"]
    assert list(sec) == list(gpu_check.SECTIONS) and res["mode"] == "cpu_quick"
    assert all(s["status"] == "ok" for s in sec.values()), {k: s["summary"] for k, s in sec.items()}
    assert sec["packages"]["missing"] == [] and sec["packages"]["versions"]["torch"] == torch.__version__
    tests = sec["gpu_tests"]  # on a CPU every gpu-marked test skips (and is counted)
    assert tests["passed"] == 0 and tests["skipped"] == tests["tests"] >= 4 and tests["failed"] == []
    rows = {r["label"]: r for r in sec["fold"]["rows"]}
    assert list(rows) == list(gpu_check.FOLD_MODES)
    n_layers = 7 * gpu_check.MODEL_QUICK["num_layers"]
    for label, r in rows.items():
        assert r["layers"] == n_layers and r["fold_matmul"] == "ieee" and r["same_checksums_twice"], label
        assert 0 < r["fold_ms"] < r["step_ms"] and 0 < r["fold_percent_of_step"] < 100, label
        assert r["tokens_per_step"] == 2 * 32 * 2
    assert rows["fp32 W"]["fold_ops"] == 5 * n_layers + 2  # operands (4) + addmm_ per layer; 2 multi-tensor resets
    assert rows["bf16 W + fp32 master"]["fold_ops"] == 6 * n_layers + 2  # + the cast of the master into W
    assert all(r["mean_cos2_right"] > 0.99 and r["k"] == 32 for r in sec["svd"]["rows"])
    coll = sec["collectives"]
    assert coll["backend"] == "gloo" and len(coll["results"]) == 10 and all(r["ok"] for r in coll["results"].values())
    rec = sec["recipe_resume"]
    assert rec["same_W"] and rec["steps"] == 6 and rec["resumed_from"] == 3 and rec["loss_full"] == rec["loss_resumed"]
    assert sec["fsdp2"]["steps"] == 2 and math.isfinite(sec["fsdp2"]["last_loss"]) and sec["fsdp2"]["W_sharded"]
    assert sec["fsdp2"]["backend"] == "gloo"
    assert sec["step_speed"]["hdpissa_over_lora_step"] > 0 and sec["step_speed"]["hdpissa_fold_ms"] > 0
    assert "bench.gpu_check (cpu_quick)" in proc.stdout and "The fold, 14 layers" in proc.stdout

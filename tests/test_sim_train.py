"""``bench/sim_train.py``, the one-process run of the real-model study, on a tiny model built here: its gradients against
a slow reference written in the test (DDP's average for the baselines, each device's own for HD-PiSSA), and a run cut
short at an evaluation point and resumed against the same run uninterrupted (every recorded number and the final
weights, bit for bit). Runs go through the real command line, ``python -m bench.sim_train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bench import sim_train
from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.testing_utils import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sim_train") / "model")


def settings(model_dir: str, method: str, **over) -> dict:
    run = dict(id="t", task="multitask", label=method, method=method, K=2, lr=1e-3, seed=0, r=2, alpha=2.0, steps=4,
               global_batch=4, eval_every=2, heldout_limit=4, curve_rows=2, em_limit=0, max_length=1024,
               model_dir=model_dir, study="test", options={})
    run.update(over)
    return run


def launch(run: dict, tmp_path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.run.json"
    path.write_text(json.dumps(run))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bench.sim_train", "--run", str(path), "--out",
                           str(tmp_path / "out" / f"{name}.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def first_batch(run: dict, tok) -> list[list[tuple[list[int], list[int]]]]:
    """The rows of step 0, split into the K devices' micro-batches (the order sim_train documents)."""
    rows = [row for t in sim_train.TASKS for row in sim_train.read_rows(f"{t}_train.jsonl")]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(run["seed"])).tolist()
    G, K = run["global_batch"], run["K"]
    picked = [rows[i] for i in order[:G]]
    encoded = [sim_train.encode(tok, r["prompt"], r["completion"], run["max_length"]) for r in picked]
    return [encoded[k * (G // K):(k + 1) * (G // K)] for k in range(K)]


def row_nll(model, ids: list[int], labels: list[int]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of one row's labelled tokens, through the model's ordinary forward (no padding)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    target = torch.tensor(labels[1:])
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"), int(keep.sum())


def grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def test_gradients_are_ddps_average_for_the_baselines_and_each_devices_own_for_hdpissa(model_dir, tmp_path):
    """Full FT at K = 2: the pre-clip norm of step 0 is the norm of ∇(Σ nll / N) over the whole global batch, which
    is DDP's average of the two devices' gradients (each device's loss 2·Σnll_k/N). HD-PiSSA: device k's norm is that
    of ∇(2·Σnll_k/N) over its own adapters, computed on a model injected as rank k of 2 (as in a real launch); with
    ``slice_gradient="global"`` it is that of ∇(Σnll/N) over the whole global batch in those adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for method, options in (("full", {}), ("hdpissa", {}), ("hdpissa", {"slice_gradient": "global"})):
        name = method + "_" + options.get("slice_gradient", "local")
        run = settings(model_dir, method, steps=1, eval_every=1, options=options)
        proc = launch(run, tmp_path, name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        recorded = json.loads((tmp_path / "out" / f"{name}.json").read_text())["grad_norms"]
        micro = first_batch(run, tok)
        n_total = sum(sum(1 for y in labels[1:] if y != -100) for part in micro for _, labels in part)
        if method == "full":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            total = sum(row_nll(model, ids, labels)[0] for part in micro for ids, labels in part)
            (total / n_total).backward()
            expected = [grad_norm(model.parameters())]
        else:
            expected = []
            for k in range(2):
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=2.0, target_modules="all-linear",
                                                    sync_check_steps=0), rank=k, world_size=2, show_progress=False)
                if options:  # every row of the global batch, DDP's normalisation
                    (sum(row_nll(model, ids, labels)[0] for part in micro for ids, labels in part) / n_total).backward()
                else:
                    nll = sum(row_nll(model, ids, labels)[0] for ids, labels in micro[k])
                    (2 * nll / n_total).backward()
                expected.append(grad_norm([p for p in model.parameters() if p.requires_grad]))
        assert recorded == pytest.approx(expected, rel=2e-4, abs=2e-5), name
    with pytest.raises(ValueError, match="is an HD-PiSSA option"):
        sim_train.train(settings(model_dir, "pissa", options={"slice_gradient": "global"}))


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [
    ("hdpissa", {"subspace": "gradient", "subspace_steps": 2, "subspace_warmup_steps": 2}),
    ("pissa", {}),
    ("full", {}),
])
def test_a_run_cut_at_an_evaluation_point_resumes_to_the_uninterrupted_result(model_dir, tmp_path, method, options):
    """The state is written after each intermediate evaluation; a run stopped there (exit 3, no record yet) and
    started again continues from it: the same curve, losses, clip norms, held-out metrics and final weights as one
    run straight through, and the state is removed once the record exists. For HD-PiSSA the schedule changes the
    directions at step 2, right at the cut, and the warm-up after it spans the resume."""
    straight = settings(model_dir, method, options=options, save_final_dir=str(tmp_path / "final_a"))
    proc = launch(straight, tmp_path, "a")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state_dir = tmp_path / "state"
    cut = dict(straight, save_final_dir=str(tmp_path / "final_b"), state_dir=str(state_dir), stop_after_step=2)
    proc = launch(cut, tmp_path, "b")
    assert proc.returncode == sim_train.STOPPED_EXIT, proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "b.json").exists() and (state_dir / sim_train.STATE_FILE).is_file()
    cut.pop("stop_after_step")
    first_part = torch.load(state_dir / sim_train.STATE_FILE, weights_only=False)["progress"]["wall_s"]
    t_second = time.time()
    proc = launch(cut, tmp_path, "b")
    t_second = time.time() - t_second
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed after step 2" in proc.stdout
    a = json.loads((tmp_path / "out" / "a.json").read_text())
    b = json.loads((tmp_path / "out" / "b.json").read_text())
    for key in ("curve", "train_losses", "grad_norms", "heldout", "clip_fraction", "subspace_restarts"):
        assert a[key] == b[key], key
    assert a["resumed_after_steps"] == [] and b["resumed_after_steps"] == [2]
    # wall_s adds the first part's time up to its saved step to the second part's, which is inside its process's
    assert 0 < first_part < b["wall_s"] < first_part + t_second
    if method == "hdpissa":
        assert a["subspace_restarts"] == 2  # the gradient schedule did change the directions (steps 2 and 4)
    wa, wb = load_file(tmp_path / "final_a" / "linears.safetensors"), load_file(tmp_path / "final_b" /
                                                                               "linears.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not state_dir.exists()


def test_a_state_from_other_settings_is_not_resumed(model_dir, tmp_path):
    """A state saved for another rate is set aside with a message and the run starts at step 0."""
    run = settings(model_dir, "full", steps=2, eval_every=1, state_dir=str(tmp_path / "state"), stop_after_step=1)
    assert launch(run, tmp_path, "x").returncode == sim_train.STOPPED_EXIT
    other = dict(run, lr=2e-3)
    other.pop("stop_after_step")
    proc = launch(other, tmp_path, "x")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "made with other settings (lr)" in proc.stdout and "resumed" not in proc.stdout
    assert len(json.loads((tmp_path / "out" / "x.json").read_text())["train_losses"]) == 2

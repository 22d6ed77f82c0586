"""W sharded by rows with FSDP2: real multi-process runs (torchrun, gloo, 1/2/4 CPU processes).

Each run trains, in the same processes on the same data and seeds, the replicated engine and the sharded engine
(one model per communication scheme) and compares the gathered full W; the K=2 run is also held against the slow
reference of ``test_fold``. Checkpoints (torch.distributed.checkpoint) resume exactly; the merged model loads with
plain transformers.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _dist import torchrun
from test_fold import reference_run
from workers.sharded_worker import make_model

from hdpissa_trl.engine.sharded import shard_rows
from hdpissa_trl.trainer.sharded_checkpoint import COMPLETE_MARKER, load_sharded_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "workers", "sharded_worker.py")
R, ALPHA, LR = 2, 4.0, 1e-2


def run(out, K: int, *args: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    torchrun(WORKER, K, ["--out", str(out), *args])
    recs = [torch.load(os.path.join(out, f"rank{k}.pt"), weights_only=False) for k in range(K)]
    assert [rec["world"] for rec in recs] == [K] * K
    return recs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    """K=2, 4 AdamW steps, both schemes, a checkpoint after step 2 and the merged model at the end."""
    out = tmp_path_factory.mktemp("k2")
    recs = run(out, 2, "--steps", "4", "--lora_r", str(R), "--alpha", str(ALPHA), "--lr", str(LR), "--save_at", "2",
               "--merged_dir", str(out / "merged"))
    return out, recs


@pytest.mark.slow
def test_sharded_w_equals_replicated_and_reference(k2):
    _, recs = k2
    ref = reference_run(2, R, ALPHA, 4, "adamw", LR)
    W0 = {n: make_model(32, 48).get_submodule(n).weight.detach() for n in ref}
    for rec in recs:
        assert rec["error"] is None
        for scheme in ("fp32/all_gather", "fp32/all_to_all"):
            assert rec["last_check"][scheme]["ok"]
            for n, w_ref in ref.items():
                w = rec["W"][scheme][n]
                assert (w - W0[n]).abs().max() > 1e-4, "the run must actually move W"
                assert rel(w, rec["W"]["fp32/replicated"][n]) <= 1e-6, (scheme, n)
                assert torch.equal(w, recs[0]["W"][scheme][n]), "every rank gathers the same full W"
                moved = (w_ref - W0[n]).abs().max().item()
                torch.testing.assert_close(w, w_ref, rtol=0, atol=2e-6 + 1e-4 * moved)
        assert rec["losses"]["fp32/all_to_all"] == pytest.approx(rec["losses"]["fp32/replicated"], rel=1e-6)


@pytest.mark.slow
def test_adapters_stay_per_device_under_fsdp(k2):
    """Neither FSDP trap: slices differ across ranks (no broadcast) and each rank's adapter gradient is its own
    local gradient, the replicated engine's on the same rank (no reduce-scatter)."""
    _, (r0, r1) = k2
    for scheme in ("fp32/all_gather", "fp32/all_to_all"):
        assert not torch.equal(r0["A_init"][scheme], r1["A_init"][scheme])
        for rec in (r0, r1):
            assert torch.equal(rec["A_init"][scheme], rec["A_init"]["fp32/replicated"])
            torch.testing.assert_close(rec["grads"][scheme], rec["grads"]["fp32/replicated"], rtol=1e-5, atol=1e-9)
        assert not torch.allclose(r0["grads"][scheme], r1["grads"][scheme])


@pytest.mark.slow
def test_each_rank_holds_one_kth_of_w(k2):
    _, recs = k2
    for rec in recs:
        for scheme in ("fp32/all_gather", "fp32/all_to_all"):
            b = rec["bytes"][scheme]
            assert b["W"] * 2 == b["W_full"], b  # measured storage of this rank's shards


@pytest.mark.slow
def test_all_to_all_moves_fewer_bytes(k2):
    """Per-rank bytes of both schemes, measured in the fold, against the counts written out here."""
    _, recs = k2
    model = make_model(32, 48)
    names = recs[0]["names"]
    K = 2
    a_side = sum(R * model.get_submodule(n).in_features for n in names)
    b_side = sum(R * model.get_submodule(n).out_features for n in names)
    for rec in recs:
        gather, a2a = rec["stats"]["fp32/all_gather"][0], rec["stats"]["fp32/all_to_all"][0]
        assert gather["num_collectives"] == 1 and a2a["num_collectives"] == 2
        assert gather["bytes_received"] == 4 * (K - 1) * (a_side + b_side)
        assert a2a["bytes_received"] == 4 * (K - 1) * (a_side + b_side // K)
        assert a2a["bytes_received"] < gather["bytes_received"]
        assert rec["comm_bytes"]["all_to_all"]["received"] == a2a["bytes_received"]


@pytest.mark.slow
def test_sharded_resume_is_exact(k2, tmp_path):
    out, recs = k2
    resumed = run(tmp_path, 2, "--steps", "4", "--lora_r", str(R), "--alpha", str(ALPHA), "--lr", str(LR),
                  "--resume", str(out / "ckpt"), "--schemes", "all_gather", "--no_replicated")
    for full, res in zip(recs, resumed):
        assert res["error"] is None
        assert res["losses"]["fp32/all_gather"] == full["losses"]["fp32/all_gather"][2:]
        for n in full["names"]:
            assert torch.equal(res["W"]["fp32/all_gather"][n], full["W"]["fp32/all_gather"][n])


@pytest.mark.slow
def test_resume_with_another_k_and_unsupported_layouts_are_refused(k2, tmp_path):
    out, _ = k2
    (rec,) = run(tmp_path, 1, "--steps", "4", "--lora_r", str(R), "--resume", str(out / "ckpt"),
                 "--schemes", "all_gather", "--no_replicated", "--refusals")
    assert "written by K=2 devices, this run has K=1" in rec["error"] and "--num_processes 2" in rec["error"]
    alone, hsdp = rec["refusals"]["linear_sharded_alone"], rec["refusals"]["two_dim_mesh"]
    assert alone.startswith("ValueError") and "model.layers.0.mlp.up_proj" in alone and "TRANSFORMER_BASED_WRAP" in alone
    assert hsdp.startswith("ValueError") and "2-D mesh" in hsdp and "HSDP" in hsdp


@pytest.mark.slow
def test_incomplete_checkpoint_is_refused(k2, tmp_path):
    out, _ = k2
    broken = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt", broken)
    os.remove(broken / COMPLETE_MARKER)
    with pytest.raises(ValueError, match="incomplete"):
        load_sharded_checkpoint(broken, engine=None)  # refused before any rank touches the model


@pytest.mark.slow
def test_merged_model_loads_with_plain_transformers(k2):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out, recs = k2
    merged = out / "merged"
    shards = sorted(p.name for p in merged.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()
    for shard in shards:
        with safe_open(str(merged / shard), "pt") as f:
            assert not any(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "A0_all", "B0_rows", "B0_own")
                           or ".base_layer." in k for k in f.keys())
    model = AutoModelForCausalLM.from_pretrained(merged)
    state = model.state_dict()
    for n in recs[0]["names"]:
        assert torch.equal(state[f"{n}.weight"], recs[0]["W"]["fp32/all_gather"][n])
    base = make_model(32, 48).state_dict()
    assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.slow
def test_k4_uneven_rows_and_bf16_master(tmp_path):
    """K=4 on a model whose row counts do not divide by 4 (k_proj: 6 rows -> 2, 2, 2, 0), fp32 and bf16 weights with
    the fp32 master sharded and FSDP2's MixedPrecisionPolicy(param_dtype=bf16)."""
    hidden, inter, kv = 24, 50, 1
    recs = run(tmp_path, 4, "--steps", "3", "--lora_r", "1", "--lr", str(LR), "--hidden", str(hidden), "--inter",
               str(inter), "--kv_heads", str(kv), "--dtypes", "fp32,bf16", "--perturb_a0_rank", "3")
    model = make_model(hidden, inter, kv)
    names = recs[0]["names"]
    assert shard_rows(model.get_submodule("model.layers.0.self_attn.k_proj").out_features, 4) == [
        (0, 2), (2, 4), (4, 6), (6, 6)]
    for k, rec in enumerate(recs):
        assert rec["error"] is None
        for scheme in ("fp32/all_gather", "fp32/all_to_all"):
            for n in names:
                assert rel(rec["W"][scheme][n], rec["W"]["fp32/replicated"][n]) <= 1e-6, (scheme, n)
            # Padded to the largest shard, as FSDP2 stores it: ceil(m/4) rows per rank.
            padded = sum(-(-model.get_submodule(n).out_features // 4) * model.get_submodule(n).in_features * 4
                         for n in names)
            assert rec["bytes"][scheme]["W"] == padded
        for scheme in ("bf16/all_gather", "bf16/all_to_all"):
            own_rows = sum((b - a) * model.get_submodule(n).in_features * 4
                           for n in names for a, b in [shard_rows(model.get_submodule(n).out_features, 4)[k]])
            assert rec["bytes"][scheme]["precision_state"] == own_rows, "the fp32 master holds this rank's rows only"
            for n in names:
                master, master_ref = rec["master"][scheme][n], rec["master"]["bf16/replicated"][n]
                assert master.dtype == torch.float32
                assert rel(master, master_ref) <= 1e-6, (scheme, n)
                assert torch.equal(rec["W"][scheme][n], master.to(torch.bfloat16))
    assert not torch.equal(recs[0]["A_init"]["fp32/all_to_all"], recs[3]["A_init"]["fp32/all_to_all"])
    # The replicated state (A0 of every slice) is checked across ranks: a drift on rank 3 is named, or re-synced.
    layer = recs[0]["names"][1]
    for rec in recs:
        assert "WeightMismatchError" in rec["mismatch"]["raise"] and repr(layer) in rec["mismatch"]["raise"]
        assert rec["mismatch"]["resync"] == [layer]
        assert torch.equal(rec["A0_after_resync"], recs[0]["A0_after_resync"])


def test_shard_rows_follow_fsdp2_layout():
    """FSDP2 shards with torch.chunk (empty trailing shards when the rows run out); shard_rows must agree."""
    for m in range(0, 40):
        for K in (1, 2, 3, 4, 8):
            chunks = list(torch.arange(m).chunk(K)) if m else []
            chunks += [torch.arange(0)] * (K - len(chunks))
            want = [(int(c[0]), int(c[-1]) + 1) if len(c) else None for c in chunks]
            got = shard_rows(m, K)
            assert [g if g[1] > g[0] else None for g in got] == want, (m, K)
            assert sum(b - a for a, b in got) == m


def test_layer_names_do_not_depend_on_activation_checkpointing_or_compile():
    from hdpissa_trl.engine.sharded import canonical_name

    assert canonical_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert canonical_name("_orig_mod.model.layers.1.self_attn.q_proj") == "model.layers.1.self_attn.q_proj"


def test_init_rounds_give_each_rank_at_most_one_layer():
    from hdpissa_trl.engine.sharded import _rounds

    assert _rounds([0, 1, 2, 0, 1, 2, 0]) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _rounds([0, 0, 0]) == [[0], [1], [2]]  # shard_init=False: rank 0 factors one layer at a time

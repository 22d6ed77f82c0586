"""W sharded by rows with FSDP2: real multi-process runs (torchrun, gloo, 1/2/4 CPU processes).

Each run trains, in the same processes on the same data and seeds, the replicated engine and the sharded engine
(one model per communication scheme, precision mode, bucket size, dropout) and compares W; the K=2 run is also held
against the slow reference of ``test_fold``. The fold's bytes are counted at the ``torch.distributed`` calls.
Checkpoints (torch.distributed.checkpoint) resume exactly, with the fp32 master / Kahan state, with uneven and empty
row shards; the merged model loads with plain transformers.
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


BUCKET_MB = 0.002  # about two layers' receive buffers per bucket on this model
SAVED = "fp32/all_gather,bf16/all_gather,bf16_kahan/all_gather,bf16_sr/all_gather,dropout/all_gather"


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    """K=2, 4 AdamW steps, both schemes; fp32 and bf16 weights (fp32 master), bf16_kahan, bf16_sr, small receive
    buckets, lora_dropout; checkpoints after step 2 and the merged model at the end."""
    out = tmp_path_factory.mktemp("k2")
    recs = run(out, 2, "--steps", "4", "--lora_r", str(R), "--alpha", str(ALPHA), "--lr", str(LR), "--save_at", "2",
               "--save_runs", SAVED, "--dtypes", "fp32,bf16", "--precisions", "bf16_kahan,bf16_sr",
               "--bucket_mb", str(BUCKET_MB), "--dropout", "0.3", "--merged_dir", str(out / "merged"))
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
                # This rank's own rows, as its fold wrote them: rows_k of the replicated W.
                a, b = shard_rows(W0[n].shape[0], 2)[rec["rank"]]
                assert rec["rows"][scheme][n] == (a, b)
                assert rel(rec["local_rows"][scheme][n], rec["W"]["fp32/replicated"][n][a:b]) <= 1e-6, (scheme, n)
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
    """Per-rank bytes of both schemes, counted at the torch.distributed calls of every fold, against the counts
    written out here; the engine's own FoldStats and comm_bytes() must say the same."""
    _, recs = k2
    model = make_model(32, 48)
    names = recs[0]["names"]
    K = 2
    a_side = sum(R * model.get_submodule(n).in_features for n in names)
    b_side = sum(R * model.get_submodule(n).out_features for n in names)
    want = {"fp32/all_gather": (["all_gather_single"], 4 * (K - 1) * (a_side + b_side)),
            "fp32/all_to_all": (["all_gather_single", "all_to_all_single"], 4 * (K - 1) * (a_side + b_side // K))}
    for rec in recs:
        for run_name, (kinds, received) in want.items():
            assert len(rec["calls"][run_name]) == 4  # one record per fold
            for calls, stats in zip(rec["calls"][run_name], rec["stats"][run_name]):
                assert [c["name"] for c in calls] == kinds, calls
                assert sum(c["received"] for c in calls) == received
                assert stats["bytes_received"] == received and stats["num_collectives"] == len(kinds)
                assert stats["bytes_sent"] == sum(c["sent"] for c in calls)
        assert want["fp32/all_to_all"][1] < want["fp32/all_gather"][1]
        assert rec["comm_bytes"]["all_to_all"]["received"] == want["fp32/all_to_all"][1]
        assert rec["comm_bytes"]["all_gather"]["received"] == want["fp32/all_gather"][1]


@pytest.mark.slow
def test_bucketed_fold_bounds_what_a_rank_receives(k2):
    """bucket_size_mb caps the buffer a rank RECEIVES into (K times what it sends), measured at the collectives: more
    collectives, none over the cap, the same bytes in total and the same W bit for bit."""
    _, recs = k2
    cap = int(BUCKET_MB * 2**20)
    for rec in recs:
        for scheme, per_bucket in (("all_gather", 1), ("all_to_all", 2)):
            plain, bucketed = rec["calls"][f"fp32/{scheme}"], rec["calls"][f"bucket/{scheme}"]
            for calls_plain, calls in zip(plain, bucketed):
                assert len(calls) >= 3 * per_bucket, len(calls)
                for i in range(0, len(calls), per_bucket):  # one bucket: its receive buffers together
                    assert sum(c["buffer"] for c in calls[i:i + per_bucket]) <= cap
                assert sum(c["received"] for c in calls) == sum(c["received"] for c in calls_plain)
            for n in rec["names"]:
                assert torch.equal(rec["W"][f"bucket/{scheme}"][n], rec["W"][f"fp32/{scheme}"][n]), (scheme, n)


def test_default_receive_buffer_is_bounded_for_a_70b_shape():
    """bucket_size_mb=0 (the default) no longer means one exchange of everything: at K=64, r=16 a Llama-3.1-70B
    shape would receive 23.8 GiB (all-to-all) / 48.6 GiB (all-gather) in one buffer per step; the default buckets
    keep each exchange at DEFAULT_RECEIVE_CAP_MB."""
    from types import SimpleNamespace

    from hdpissa_trl.engine.sharded import DEFAULT_RECEIVE_CAP_MB, receive_buckets

    shapes = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]
    layers = [SimpleNamespace(r=16, out_features=m, in_features=n) for m, n in shapes * 80]
    K = 64
    for scheme in ("all_gather", "all_to_all"):
        total = sum(4 * K * 16 * (n + (m if scheme == "all_gather" else -(-m // K))) for m, n in shapes * 80)
        assert total > 20 * 2**30  # what one unbucketed exchange received
        buckets = receive_buckets(layers, K, scheme, 0)
        assert sorted(i for b in buckets for i in b) == list(range(len(layers)))
        for b in buckets:
            got = sum(4 * K * 16 * (layers[i].in_features + (layers[i].out_features if scheme == "all_gather"
                                                               else -(-layers[i].out_features // K))) for i in b)
            assert got <= DEFAULT_RECEIVE_CAP_MB * 2**20


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance between consecutive bf16 numbers around each entry of ``x``."""
    return torch.finfo(torch.bfloat16).eps * x.abs().clamp_min(1e-30).log2().floor().exp2()


@pytest.mark.slow
def test_bf16_kahan_and_stochastic_rounding_under_sharding(k2):
    """bf16 weights with W sharded. The first fold starts every bf16 run from the same W and the same update, so
    against the fp32 master run's exact sum: bf16_kahan rounds to the nearest bf16 and keeps what rounding dropped in
    its compensation; bf16_sr lands on one of the two bf16 neighbours, not always the nearest (each row shard draws its
    own bits). After 4 folds bf16_kahan still carries the replicated engine's W + compensation; each rank holds its
    rows of the compensation only."""
    _, recs = k2
    model = make_model(32, 48)
    for rec in recs:
        away = total = 0
        for n in rec["names"]:
            exact = rec["first_fold"]["bf16/replicated"][n]["master"]
            assert rel(rec["first_fold"]["bf16/all_gather"][n]["master"], exact) <= 1e-6
            gap = bf16_spacing(exact)
            for name in ("bf16_kahan/all_gather", "bf16_kahan/replicated"):
                w, comp = rec["first_fold"][name][n]["W"].float(), rec["first_fold"][name][n]["compensation"].float()
                assert ((w - exact).abs() <= 0.5 * gap * (1 + 1e-3)).all(), (name, n)  # the nearest bf16
                # Kahan's compensation holds minus what rounding dropped: W - c is the exact sum.
                assert ((w - comp - exact).abs() <= 1e-6 * exact.abs() + 2.0 ** -8 * gap).all(), (name, n)
            for name in ("bf16_sr/all_gather", "bf16_sr/replicated"):
                w = rec["first_fold"][name][n]["W"]
                assert ((w.float() - exact).abs() <= gap * (1 + 1e-3)).all(), (name, n)  # a bf16 neighbour
                if name == "bf16_sr/all_gather":
                    away += int((w != exact.to(torch.bfloat16)).sum())
                    total += w.numel()
            w, w_ref = rec["W"]["bf16_kahan/all_gather"][n], rec["W"]["bf16_kahan/replicated"][n]
            comp, comp_ref = (rec["precision"][f"bf16_kahan/{scheme}"][n]["compensation"]
                              for scheme in ("all_gather", "replicated"))
            assert w.dtype == comp.dtype == torch.bfloat16
            assert not torch.equal(w, rec["first_fold"]["bf16_kahan/all_gather"][n]["W"]), "later folds move W"
            assert rel(w.float() - comp.float(), w_ref.float() - comp_ref.float()) <= 1e-6, n
            assert rec["precision"]["bf16_sr/all_gather"][n] == {}  # no extra state: the weight is the state
        assert 0.05 < away / total < 0.5, away / total  # stochastic: often not the nearest (about 1/4 expected)
        k = rec["rank"]
        assert rec["bytes"]["bf16_kahan/all_gather"]["precision_state"] == sum(
            (b - a) * model.get_submodule(m).in_features * 2
            for m in rec["names"] for a, b in [shard_rows(model.get_submodule(m).out_features, 2)[k]])


@pytest.mark.slow
def test_lora_dropout_under_sharding(k2):
    """lora_dropout with W sharded: the same masks give the replicated engine's W, and dropout changed the run."""
    _, recs = k2
    for rec in recs:
        for n in rec["names"]:
            w = rec["W"]["dropout/all_gather"][n]
            assert rel(w, rec["W"]["dropout/replicated"][n]) <= 1e-6, n
        assert any(rel(rec["W"]["dropout/all_gather"][n], rec["W"]["fp32/all_gather"][n]) > 1e-4
                   for n in rec["names"])


@pytest.mark.slow
def test_sharded_resume_is_exact(k2, tmp_path):
    """Every saved run resumes bit for bit: fp32, bf16 with its fp32 master, bf16_kahan with its compensation, bf16_sr,
    lora_dropout. A checkpoint is refused, before anything loads, by a run with another lora_dropout (any config
    field but the operational ones, as the replicated engine's resume)."""
    out, recs = k2
    resumed = run(tmp_path, 2, "--steps", "4", "--lora_r", str(R), "--alpha", str(ALPHA), "--lr", str(LR),
                  "--resume", "auto", "--ckpt_root", str(out), "--schemes", "all_gather", "--no_replicated",
                  "--dtypes", "fp32,bf16", "--precisions", "bf16_kahan,bf16_sr", "--dropout", "0.3",
                  "--resume_refusals")
    for full, res in zip(recs, resumed):
        assert res["error"] is None
        assert "HDPiSSAConfig.lora_dropout=0.0, this run has lora_dropout=0.25" in res["refused_dropout"]
        assert sorted(res["losses"]) == sorted(SAVED.split(","))
        for name in SAVED.split(","):
            assert res["losses"][name] == full["losses"][name][2:], name
            for n in full["names"]:
                assert torch.equal(res["W"][name][n], full["W"][name][n]), (name, n)
                got, want = res["precision"][name][n], full["precision"][name][n]
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (name, n)
        assert set(full["precision"]["bf16/all_gather"][full["names"][0]]) == {"master"}
        assert set(full["precision"]["bf16_kahan/all_gather"][full["names"][0]]) == {"compensation"}


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


@pytest.fixture(scope="module")
def k4(tmp_path_factory):
    """K=4 on a model whose row counts do not divide by 4 (k_proj: 6 rows -> 2, 2, 2, 0), r=2 that does not fit k_proj /
    v_proj (K·r = 8 > 6: fitted to r=1), randomized init; fp32 and bf16 weights with the fp32 master sharded and FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16); checkpoints after step 2; the consistency check fed a drifted A0 on rank 3,
    then a drifted B0 and a fold that no longer reaches the forward on rank 1."""
    out = tmp_path_factory.mktemp("k4")
    recs = run(out, 4, *K4_ARGS, "--dtypes", "fp32,bf16", "--init", "randomized", "--save_at", "2",
               "--save_runs", "fp32/all_to_all,bf16/all_to_all", "--perturb_a0_rank", "3", "--perturb_rank", "1")
    return out, recs


K4_ARGS = ["--steps", "3", "--lora_r", "2", "--lr", str(LR), "--hidden", "24", "--inter", "50", "--kv_heads", "1"]


@pytest.mark.slow
def test_k4_uneven_rows_fitted_ranks_and_bf16_master(k4):
    _, recs = k4
    model = make_model(24, 50, 1)
    names = recs[0]["names"]
    assert shard_rows(model.get_submodule("model.layers.0.self_attn.k_proj").out_features, 4) == [
        (0, 2), (2, 4), (4, 6), (6, 6)]
    fitted = dict(zip(names, recs[0]["ranks"]["fp32/all_to_all"]))
    assert fitted["model.layers.0.self_attn.k_proj"] == 1 and fitted["model.layers.0.self_attn.q_proj"] == 2
    for k, rec in enumerate(recs):
        assert rec["error"] is None
        for scheme in ("fp32/all_gather", "fp32/all_to_all", "bf16/all_gather", "bf16/all_to_all"):
            ref = scheme.split("/")[0] + "/replicated"
            assert rec["ranks"][scheme] == rec["ranks"][ref]
            # Randomized init with fitted ranks: the replicated engine's seeds, so the very same factors.
            for a0, a0_ref in zip(rec["A0_all"][scheme], rec["A0_all"][ref]):
                assert torch.equal(a0, a0_ref), scheme
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


@pytest.mark.slow
def test_k4_checks_a0_b0_and_the_rows_each_fold_writes(k4):
    """The check compares what must agree although each row of W has one owner: a drifted A0 on rank 3 is named (or
    re-synced from rank 0); a drifted B0 row on rank 1, and rank 1's fold writing rows that FSDP2 no longer gathers
    for the forward, stop every rank with the layer, the rows and the ranks named (nothing to re-sync from)."""
    _, recs = k4
    layer = recs[0]["names"][1]
    first = recs[0]["names"][0]
    for rec in recs:
        assert all(check["ok"] for check in rec["last_check"].values())
        assert "WeightMismatchError" in rec["mismatch"]["raise"] and repr(layer) in rec["mismatch"]["raise"]
        assert rec["mismatch"]["resync"] == [layer]
        assert torch.equal(rec["A0_after_resync"], recs[0]["A0_after_resync"])
        failures = rec["failures"]
        assert failures["B0"].startswith("WeightMismatchError") and repr(first) in failures["B0"]
        assert "rows 6:12 of device 0's initial factor B0 held by rank 1" in failures["B0"]
        assert failures["clean"] == "no error"
        assert failures["W"].startswith("WeightMismatchError") and repr(first) in failures["W"]
        assert "rows 6:12 of W as FSDP2 gathers them" in failures["W"] and "rank 1's fold writes" in failures["W"]


@pytest.mark.slow
def test_k4_checkpoint_with_uneven_and_empty_shards_resumes_exactly(k4, tmp_path):
    """torch.distributed.checkpoint with row shards of 2, 2, 2 and 0 rows (and an fp32 master of those rows): the
    resumed K=4 run ends with the uninterrupted run's W, master and losses, bit for bit."""
    out, recs = k4
    resumed = run(tmp_path, 4, *K4_ARGS, "--dtypes", "fp32,bf16", "--init", "randomized", "--schemes", "all_to_all",
                  "--no_replicated", "--resume", "auto", "--ckpt_root", str(out))
    for full, res in zip(recs, resumed):
        assert res["error"] is None
        for name in ("fp32/all_to_all", "bf16/all_to_all"):
            assert res["losses"][name] == full["losses"][name][2:], name
            for n in full["names"]:
                assert torch.equal(res["W"][name][n], full["W"][name][n]), (name, n)
                assert torch.equal(res["local_rows"][name][n], full["local_rows"][name][n])
            assert all(torch.equal(res["master"][name][n], full["master"][name][n]) for n in full["master"][name])
    assert [r["rows"]["fp32/all_to_all"]["model.layers.0.self_attn.k_proj"] for r in resumed] == [
        (0, 2), (2, 4), (4, 6), (6, 6)]


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

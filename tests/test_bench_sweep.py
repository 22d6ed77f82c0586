"""``bench/sweep.py``: best rate per method, paired-by-seed table and wins from run JSONs; resumable tiny sweeps
(real torchrun, 2 gloo processes); the real-model driver's held-out accuracy against slow references."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import sweep
from bench._runlog import load_runs, run_id, write_run


def _rec(label: str, lr: float, seed: int, loss: float) -> dict:
    return {"task": "t", "label": label, "method": sweep.LABELS[label][0], "K": sweep.LABELS[label][1], "lr": lr,
            "seed": seed, "r": 2, "steps": 5, "lora_alpha": 2.0, "global_batch": 4, "kind": "tiny",
            "heldout": {"eval_loss": loss, "agree": 1 - loss}, "train_loss_last_half": loss + 1,
            "step_time_s": 0.1, "peak_rss_bytes": 2**20, "load_avg_1min_start": 1.0, "load_avg_1min_end": 2.0,
            "env": {"logical_cores": 2}}


def test_summary_best_rate_paired_and_wins(tmp_path):
    # PiSSA: best at lr 1e-2 (mean 1.0); HD-PiSSA: best at 3e-3 (mean 0.9), its worse rate has a lower seed-0 value
    # than its best — the pick is by the mean over seeds.
    pissa = {1e-2: [1.0, 1.1, 0.9], 3e-3: [1.2, 1.2, 1.2]}
    hd = {3e-3: [0.95, 0.9, 0.85], 1e-3: [0.5, 2.0, 2.0]}
    recs = [_rec("pissa2", lr, s, v) for lr, vs in pissa.items() for s, v in enumerate(vs)]
    recs += [_rec("hdpissa2", lr, s, v) for lr, vs in hd.items() for s, v in enumerate(vs)]
    best = sweep.best_lrs(recs)
    assert best[("t", "pissa2")]["lr"] == 1e-2 and best[("t", "hdpissa2")]["lr"] == 3e-3
    assert best[("t", "hdpissa2")]["edge"] and best[("t", "pissa2")]["edge"]  # both grids have 2 points
    md, summary = sweep.summarize_study("s", recs, references=["pissa2"])
    paired = summary["tasks"]["t"]["paired"]["pissa2"]["hdpissa2"]["eval_loss"]
    assert paired["mean"] == pytest.approx(((0.95 - 1.0) + (0.9 - 1.1) + (0.85 - 0.9)) / 3)
    assert (paired["lower"], paired["n"]) == (3, 3)
    assert summary["tasks"]["t"]["wins"]["all"] == {"hdpissa2": 3, "pissa2": 0}
    assert "| HD-PiSSA K=2 | 0,1,2 | -0.1000 ± 0.0866 (3/3) |" in md
    assert "**0.9000**" in md and "**1.0000**" in md  # the best cells are marked
    # The BENCHMARKS.md block is replaced between its markers, text around it kept.
    text = "a\n<!-- sweep:s:begin -->\nold\n<!-- sweep:s:end -->\nb\n"
    assert sweep.replace_block(text, "s", "new") == "a\n<!-- sweep:s:begin -->\nnew\n<!-- sweep:s:end -->\nb\n"
    with pytest.raises(SystemExit, match="no block for study 'x'"):
        sweep.replace_block(text, "x", "new")
    # Edge extension goes one grid step beyond the best end.
    assert sweep._edge_extensions({}, recs, ["hdpissa2", "pissa2"]) == {"hdpissa2": [0.009], "pissa2": [0.0333]}


def test_decision_is_marked_provisional_until_every_decision_seed_has_run():
    """smollm2_100 chooses rates on seed 0 and decides on seeds 1 and 2: with seed 1 alone the table says so."""
    def recs(seeds):
        out = [dict(_rec("pissa2", 5e-4, s, v), study="smollm2_100") for s, v in zip(seeds, [0.20, 0.19, 0.18])]
        out += [dict(_rec("hdpissa2", 5e-4, s, v), study="smollm2_100") for s, v in zip(seeds, [0.19, 0.20, 0.19])]
        return out

    md, summary = sweep.summarize_study("smollm2_100", recs([0, 1]), references=["pissa2"])
    decision = summary["tasks"]["t"]["decision"]
    assert "PROVISIONAL, not a decision: seed(s) 2 of the decision seeds 1, 2" in md
    assert decision["provisional"] and decision["seeds"] == [1] and decision["pissa2"]["beats"] == ["hdpissa2"]
    md, summary = sweep.summarize_study("smollm2_100", recs([0, 1, 2]), references=["pissa2"])
    decision = summary["tasks"]["t"]["decision"]
    assert "**t: decision on seeds 1, 2**" in md and "PROVISIONAL" not in md
    # pissa2 lower on seed 1 (0.19 vs 0.20) and seed 2 (0.18 vs 0.19) and on the mean: it beats HD-PiSSA.
    assert not decision["provisional"] and decision["pissa2"]["beats"] == ["hdpissa2"]
    assert decision["hdpissa2"]["beaten_by"] == ["pissa2"] and decision["undecided"] == []
    # An arm still missing a decision seed does not hold the others' decision back: it is named, not tabled.
    extra = [dict(_rec("lora2", 8e-3, s, v), study="smollm2_100") for s, v in [(0, 0.17), (1, 0.10)]]
    md, summary = sweep.summarize_study("smollm2_100", recs([0, 1, 2]) + extra, references=["pissa2"])
    decision = summary["tasks"]["t"]["decision"]
    assert "**t: decision on seeds 1, 2**" in md and "PROVISIONAL" not in md
    assert decision["undecided"] == ["lora2"] and "lora2" not in decision and "lora2" not in decision["pissa2"]["beats"]
    assert "Not decided yet (a decision seed has not run at their chosen rate): PEFT LoRA (seeds run: 0, 1)." in md


def test_shared_rate_table_of_the_papers_setting_beside_the_tuned_rates():
    """smollm2_paper runs every method at one shared rate on seeds 1 and 2: per rate, who is lower and who beats whom
    by the decision rule; beside it, the same seeds at each method's rate chosen on smollm2_100's seed 0."""
    paper = {("pissa2", 2e-5): [0.50, 0.40], ("hdpissa2", 2e-5): [0.45, 0.41], ("lora2", 2e-5): [0.90, 0.80],
             ("pissa2", 2e-4): [0.21, 0.20], ("hdpissa2", 2e-4): [0.22, 0.19]}
    recs = [dict(_rec(lab, lr, s, v), study="smollm2_paper") for (lab, lr), vs in paper.items()
            for s, v in zip((1, 2), vs)]
    # tuned study: PiSSA's seed 0 prefers 5e-4 (its seed-1/2 runs there count), HD-PiSSA's 1e-3; LoRA never ran
    tuned = [dict(_rec(lab, lr, s, v), study="smollm2_100") for lab, lr, s, v in [
        ("pissa2", 5e-4, 0, 0.19), ("pissa2", 1e-3, 0, 0.30), ("pissa2", 5e-4, 1, 0.18), ("pissa2", 5e-4, 2, 0.17),
        ("pissa2", 1e-3, 1, 0.05), ("hdpissa2", 1e-3, 0, 0.20), ("hdpissa2", 1e-3, 1, 0.16)]]
    md, summary = sweep.summarize_study("smollm2_paper", recs, references=["pissa2"], tuned=tuned)
    assert "**t: one shared learning rate for every method**" in md
    table = md.split("**t: one shared learning rate for every method**")[1].split("\n\n")[1]  # the first table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["PEFT PiSSA"] == ("| PEFT PiSSA | 0.5000 / 0.4000 (mean 0.4500) | 0.2100 / 0.2000 (mean 0.2050) | "
                                  "0.1800 / 0.1700 (mean 0.1750) at 0.0005 |")
    assert rows["HD-PiSSA K=2"].endswith("| 0.1600 (seed 1 only) at 0.001 |")
    assert rows["PEFT LoRA"].endswith("| 0.9000 / 0.8000 (mean 0.8500) |  | not run |")
    shared = summary["shared_rates"]
    # at 2e-5 HD-PiSSA has the lowest mean (0.43 vs 0.45) but is higher on seed 2: it beats only LoRA; so does PiSSA
    assert shared["2e-05"]["order"] == ["hdpissa2", "pissa2", "lora2"]
    assert shared["2e-05"]["beats"] == {"hdpissa2": ["lora2"], "pissa2": ["lora2"], "lora2": []}
    assert shared["2e-05"]["mean"]["hdpissa2"] == pytest.approx(0.43)
    assert shared["0.0002"]["order"] == ["hdpissa2", "pissa2"] and shared["0.0002"]["beats"] == {"hdpissa2": [],
                                                                                               "pissa2": []}
    assert "At lr 0.0002 (seeds 1, 2), lowest mean first: HD-PiSSA K=2 < PEFT PiSSA. No method is lower" in md


def test_a_label_without_a_rate_choosing_run_is_listed_not_tabled():
    """smollm2_100 chooses rates on seed 0: a label that ran only on seed 1 has no rate yet; the summary names it and
    leaves it out of the tables instead of failing."""
    recs = [dict(_rec("pissa2", 5e-4, s, v), study="smollm2_100") for s, v in [(0, 0.20), (1, 0.19)]]
    recs.append(dict(_rec("hdpissa2_globalgrad", 5e-4, 1, 0.18), study="smollm2_100"))
    assert list(sweep.best_lrs(recs)) == [("t", "pissa2")]
    md, summary = sweep.summarize_study("smollm2_100", recs, references=["pissa2"])
    assert summary["pending"] == ["hdpissa2_globalgrad (lr 0.0005, seed 1)"]
    assert "Not in the tables until a rate-choosing seed of theirs has run: hdpissa2_globalgrad" in md
    assert "slices on the global batch" not in md  # no row for it


def test_run_files_are_atomic_and_listed(tmp_path):
    rid = run_id("t", "pissa2", 2, 2.0, 1e-3, 5, 0)
    assert rid == "t__pissa2__r2_a2__lr0.001__steps5__s0"
    write_run(str(tmp_path), rid, {"x": 1})
    (tmp_path / "summary.json").write_text("{}")  # the summary next to the runs is not a run
    assert load_runs(str(tmp_path)) == [{"x": 1}] and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.slow
def test_tiny_sweep_writes_one_json_per_run_and_resumes(tmp_path):
    """2 gloo processes: every planned run leaves a complete JSON; a second invocation runs nothing."""
    from bench import quality

    sweep.STUDIES["_test"] = dict(kind="tiny", tasks=["teacher_student"], labels=["hdpissa2", "pissa2"],
                                  grid={"hdpissa": [1e-2, 3e-2], "pissa": [1e-2]}, steps=2, eval_every=1, r=2,
                                  alpha=4.0, global_batch=4, seeds=[0], references=["pissa2"], model=quality.QUICK_MODEL,
                                  ceiling_ks=[4])
    try:
        args = ["run", "_test", "--results_dir", str(tmp_path / "res"), "--work_dir", str(tmp_path / "w"),
                "--extend_edges", "0"]
        sweep.main(args)
        files = sorted(os.listdir(tmp_path / "res" / "_test"))
        assert files == [f"teacher_student__{lab}__r2_a4__lr{lr}__steps2__s0.json"
                         for lab, lr in (("hdpissa2", "0.01"), ("hdpissa2", "0.03"), ("pissa2", "0.01"))]
        mtimes = {f: os.stat(tmp_path / "res" / "_test" / f).st_mtime_ns for f in files}
        sweep.main(args)  # resumes: nothing left to run, nothing rewritten
        assert {f: os.stat(tmp_path / "res" / "_test" / f).st_mtime_ns for f in files} == mtimes
        for f in files:
            rec = json.loads((tmp_path / "res" / "_test" / f).read_text())
            assert rec["processes"] == 2 and rec["global_batch"] == 4 and rec["lora_alpha"] == 4.0
            assert rec["heldout"] == rec["curve"][-1][1] and len(rec["curve"]) == 3 and len(rec["train_losses"]) == 2
            assert 0 <= rec["heldout"]["agree"] <= 1 and rec["peak_rss_bytes"] > 2**20 and rec["step_time_s"] > 0
            assert 0 < rec["heldout"]["outside_k4"] < 1  # the measured share of ΔW outside the top-4 set
        sweep.main(["summary", "_test", "--results_dir", str(tmp_path / "res"), "--figures_dir", str(tmp_path / "fig")])
        assert os.path.exists(tmp_path / "fig" / "sweep__test.png")  # the figure goes where asked, not into bench/
        assert "HD-PiSSA K=2" in (tmp_path / "res" / "_test" / "SUMMARY.md").read_text()
    finally:
        sweep.STUDIES.pop("_test")


def test_heldout_accuracy_against_slow_reference(tmp_path):
    """token accuracy and exact match from one prefix at a time; multiple choice from the model's own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import real_model
    from hdpissa_trl.testing_utils import save_tiny_model

    model_dir = tmp_path / "m"
    save_tiny_model(model_dir, seed=5)
    rows = [{"prompt": "pick one", "completion": "red", "choices": ["blue", "red", "green"], "label": 1},
            {"prompt": "pick again", "completion": "tree", "choices": ["tree", "stone"], "label": 0}]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = real_model.heldout_metrics(str(model_dir), [f"t={data}"], limit=2, cache=str(tmp_path / "c.json"))["t"]

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def ids_of(prompt, completion):
        user = [{"role": "user", "content": prompt}]
        p = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False),
                   add_special_tokens=False)["input_ids"]
        return p, full

    correct = count = exact = 0
    picks = []
    for r in rows:
        p, full = ids_of(r["prompt"], r["completion"])
        hits = []
        for i in range(len(p), len(full)):  # one prefix at a time: does the model's top token come next?
            with torch.no_grad():
                hits.append(int(model(torch.tensor([full[:i]])).logits[0, -1].argmax()) == full[i])
        correct, count, exact = correct + sum(hits), count + len(hits), exact + all(hits)
        lls = []
        for ch in r["choices"]:
            p, full = ids_of(r["prompt"], ch)
            labels = torch.tensor([[-100] * len(p) + full[len(p):]])
            with torch.no_grad():
                lls.append(-model(torch.tensor([full]), labels=labels).loss.item() * (len(full) - len(p)))
        picks.append(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    assert got["token_acc"] == pytest.approx(correct / count)
    assert got["exact"] == exact / len(rows)
    assert got["choice_acc"] == sum(picks) / len(picks)


def test_figure_panels_each_best_rate_or_one_shared_rate_per_panel():
    """A tuned study's figure shows each method at its own best rate; a shared-rate study's (smollm2_paper) one
    panel per rate with every method at it: the mean over seeds at each evaluation step, checked by hand."""
    def run(label, lr, seed, final, mid):
        return dict(_rec(label, lr, seed, final), curve=[[0, {"eval_loss": 1.0}], [20, {"eval_loss": mid}],
                                                         [40, {"eval_loss": final}]])
    recs = [run("pissa2", 2e-5, 1, 0.50, 0.70), run("pissa2", 2e-5, 2, 0.40, 0.60),
            run("pissa2", 2e-4, 1, 0.20, 0.30), run("pissa2", 2e-4, 2, 0.22, 0.34),
            run("hdpissa2", 2e-5, 1, 0.45, 0.55), run("hdpissa2", 2e-5, 2, 0.41, 0.57),
            run("hdpissa2", 2e-4, 1, 0.30, 0.40)]
    shared = sweep.curve_panels(recs, shared_rates=True)
    assert set(shared) == {("t", 2e-5, "eval_loss"), ("t", 2e-4, "eval_loss")}
    lr, steps, vals = shared[("t", 2e-5, "eval_loss")]["pissa2"]
    assert lr == 2e-5 and steps == [0, 20, 40] and vals == pytest.approx([1.0, 0.65, 0.45])
    assert shared[("t", 2e-4, "eval_loss")]["hdpissa2"][2] == pytest.approx([1.0, 0.40, 0.30])
    best = sweep.curve_panels(recs)
    assert set(best) == {("t", None, "eval_loss")}
    # PiSSA's best rate is 2e-4 (mean 0.21), HD-PiSSA's is 2e-4 too (0.30 < 0.43)
    assert best[("t", None, "eval_loss")]["pissa2"][0] == 2e-4
    assert best[("t", None, "eval_loss")]["pissa2"][2] == pytest.approx([1.0, 0.32, 0.21])
    assert best[("t", None, "eval_loss")]["hdpissa2"][0] == 2e-4

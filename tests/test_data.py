"""The mixture builder: TRL's loader per dataset, column mapping, templates, fraction shares, clear errors."""

import json

import pytest
from trl import DatasetMixtureConfig
from trl.scripts.utils import DatasetConfig

from hdpissa_trl.scripts.data import ALPACA_TEMPLATE, DataError, build_mixture


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl", [{"query": f"q{i}", "response": f"r{i}"} for i in range(40)])
    code = write_jsonl(tmp_path / "code.jsonl", [{"query": f"c{i}", "answer": f"a{i}", "x": 1} for i in range(10)])
    return math, code


def cfg(*entries, **kw):
    return DatasetMixtureConfig(datasets=[DatasetConfig(**e) for e in entries], **kw)


def test_mapping_and_fraction_shares(files):
    math, code = files
    mix = cfg({"path": "json", "data_files": math, "fraction": 0.5},
              {"path": "json", "data_files": code, "columns": ["query", "answer"], "fraction": 0.5})
    ds = build_mixture(mix, {math: {"query": "prompt", "response": "completion"},
                             code: {"query": "prompt", "answer": "completion"}})["train"]
    # TRL's rule: equal shares, capped by the smaller dataset (10 rows) -> 10 + 10, first rows of each.
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == 20
    assert ds["prompt"][:10] == [f"q{i}" for i in range(10)] and ds["prompt"][10:] == [f"c{i}" for i in range(10)]


def test_alpaca_and_chat_templates_and_test_split(files):
    math, _ = files
    mapping = {math: {"query": "prompt", "response": "completion"}}
    ds = build_mixture(cfg({"path": "json", "data_files": math}, test_split_size=0.25), mapping, "alpaca")
    assert len(ds["train"]) == 30 and len(ds["test"]) == 10
    assert ds["train"][0]["prompt"].startswith("Below is an instruction") and ds["train"][0]["prompt"].endswith(
        "### Response:\n")
    assert ALPACA_TEMPLATE.format(prompt="q0") in {r["prompt"] for r in ds["train"]} | {r["prompt"] for r in ds["test"]}
    chat = build_mixture(cfg({"path": "json", "data_files": math}), mapping, "chat")["train"]
    assert chat[0]["prompt"] == [{"role": "user", "content": "q0"}]
    assert chat[0]["completion"] == [{"role": "assistant", "content": "r0"}]


def test_missing_columns_name_dataset_and_its_columns(files):
    math, _ = files
    with pytest.raises(DataError, match=r"needs 'prompt'\+'completion'.*it has \['query', 'response'\]"):
        build_mixture(cfg({"path": "json", "data_files": math}))
    with pytest.raises(DataError, match=r"has no column\(s\) \['question'\].*it has \['query', 'response'\]"):
        build_mixture(cfg({"path": "json", "data_files": math}), {math: {"question": "prompt"}})


def test_empty_and_missing_and_offline_hub(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*empty or malformed"):
        build_mixture(cfg({"path": "json", "data_files": str(empty)}))
    with pytest.raises(DataError, match="not found"):
        build_mixture(cfg({"path": "json", "data_files": str(tmp_path / "nope.jsonl")}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="(?s)Cannot load dataset .meta-math/MetaMathQA.*data_files: path/to/train.jsonl"):
        build_mixture(cfg({"path": "meta-math/MetaMathQA"}))
    with pytest.raises(DataError, match="No datasets configured"):
        build_mixture(DatasetMixtureConfig(datasets=[]))

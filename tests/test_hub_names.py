"""hdpissa_trl/trainer/hub.py: which names are Hub model ids (a card's ``base_model``; the demo's refusal to build a
random model at a name the Hub would resolve) and which are local paths."""

from __future__ import annotations

import os

import pytest

from hdpissa_trl.trainer.hub import looks_like_hub_id


@pytest.mark.parametrize("name,any_id,namespaced", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True, True),
    ("gpt2", True, False),                 # a canonical id: from_pretrained would fetch it, a card cannot link it
    ("./org/model", False, False),          # written as a path on purpose
    ("/abs/org/model", False, False),
    ("a/b/c", False, False),                # a nested path, never a repo id
    ("org/model name", False, False),       # a space: not a valid repo id
    ("org/--bad", False, False),
    ("", False, False),
    (None, False, False),
])
def test_hub_id_or_local_path(name, any_id, namespaced):
    assert looks_like_hub_id(name) is any_id
    assert looks_like_hub_id(name, namespaced=True) is namespaced


def test_an_existing_directory_is_a_path_even_when_it_reads_like_an_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("org/model")
    assert not looks_like_hub_id("org/model")
    assert not looks_like_hub_id("org/model", namespaced=True)
    assert looks_like_hub_id("org/other", namespaced=True)

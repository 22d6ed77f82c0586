import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def tokenizer():
    """The repository's locally built tokenizer (no hub): what the evaluation and export tests generate with."""
    from hdpissa_trl.testing_utils import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny Llama built from a config with ``tokenizer``'s vocabulary, in eval mode (a module that needs another
    model defines its own fixture of this name, which takes precedence)."""
    from hdpissa_trl.testing_utils import build_tiny_model

    return build_tiny_model("llama", seed=0, tokenizer=tokenizer).eval()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that run benchmark workers in-process set torch's global thread count; restore it, so a later test that
    compares this process's numbers with a fresh subprocess's (same thread count, same reduction order) is exact."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

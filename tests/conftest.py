import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that run benchmark workers in-process set torch's global thread count; restore it, so a later test that
    compares this process's numbers with a fresh subprocess's (same thread count, same reduction order) is exact."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

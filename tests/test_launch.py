"""hdpissa_trl.launch: the helpers that start real multi-process runs, and the way their children end."""

from __future__ import annotations

import pytest
from _dist import torchrun

WORKER = '''
import os, sys
import torch
import torch.distributed as dist
from hdpissa_trl.launch import end_worker

dist.init_process_group("gloo")
rank = dist.get_rank()
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
print(f"rank {rank} sum {total.item()}")
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(str(total.item()))
if sys.argv[2] == "destroyed":
    dist.destroy_process_group()
end_worker()
raise SystemExit(3)  # never reached: end_worker does not return
'''


@pytest.mark.parametrize("group", ["up", "destroyed"])
def test_end_worker_exits_zero_and_keeps_output(tmp_path, group):
    """2 gloo processes end through end_worker: status 0 for the launch (the SystemExit(3) after it never runs), both
    ranks' output and files kept; with the group still up or already destroyed by the worker."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun(str(script), 2, [str(tmp_path), group], timeout=120)
    for rank in (0, 1):
        assert f"rank {rank} sum 3.0" in proc.stdout
        assert (tmp_path / f"rank{rank}.txt").read_text() == "3.0"

"""hdpissa_trl.engine.distributed: the end of a run (shutdown_distributed) and the plumbing around it."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from _dist import torchrun

from hdpissa_trl.engine.distributed import is_distributed, shutdown_distributed, world_and_rank

# Each iteration starts a fresh 2-process gloo group (a file store per iteration), trains one DDP step, all-gathers
# Python-owned tensors, waits at a barrier and ends through shutdown_distributed, then drops the DDP module. With the
# plain order (destroy_process_group(), then the DDP module freed) this loop hung within 18 iterations in each of 4
# tries here: the Reducer's release ran gloo's destructor with the GIL held while a worker thread waited for the GIL.
# faulthandler turns a hang into a failing exit with every thread's stack instead of a long torchrun timeout.
STRESS_WORKER = '''
import faulthandler, os, sys
import torch
import torch.distributed as dist
from hdpissa_trl.engine.distributed import shutdown_distributed

store_dir, iterations = sys.argv[1], int(sys.argv[2])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
for i in range(iterations):
    faulthandler.dump_traceback_later(60, exit=True)  # re-armed each cycle (a new call replaces the last timer)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store_{i}", rank=rank, world_size=world)
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    x = torch.full((1, 3), float(rank + 1))
    ddp(x).sum().backward()
    # DDP averages the weight gradient: d(sum(Wx + b))/dW = x for every output row, so the mean over ranks of x.
    expected = torch.full((2, 3), sum(k + 1.0 for k in range(world)) / world)
    assert torch.equal(ddp.module.weight.grad, expected), (ddp.module.weight.grad, expected)
    gathered = [torch.empty(4) for _ in range(world)]
    dist.all_gather(gathered, torch.full((4,), float(rank)))
    assert [g[0].item() for g in gathered] == [float(k) for k in range(world)]
    dist.barrier()
    shutdown_distributed(ddp)
    assert not dist.is_initialized() and not hasattr(ddp, "reducer")
    del ddp  # the last holder of the Reducer goes after the group: this is where the plain order hung
print(f"rank {rank}: {iterations} iterations ended", flush=True)
'''


def test_shutdown_after_ddp_never_hangs(tmp_path):
    """100 start-train-gather-end cycles of 2 gloo processes, each ended by shutdown_distributed: every DDP gradient
    and all-gather checked against the arithmetic mean / the ranks, no hang, both ranks report the end."""
    script = tmp_path / "stress.py"
    script.write_text(STRESS_WORKER)
    proc = torchrun(str(script), 2, [str(tmp_path), "100"], timeout=240)
    for rank in (0, 1):
        assert f"rank {rank}: 100 iterations ended" in proc.stdout


@pytest.fixture
def single_process_group(tmp_path):
    """A real 1-process gloo group in this process (a file store), destroyed afterwards if the test left it up."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_shutdown_frees_the_reducers_a_trainer_reaches(single_process_group):
    """A trainer-shaped owner: the DDP modules in ``model_wrapped`` and in the accelerator's prepared models lose their
    reducers, and the group is gone afterwards."""
    reached, in_accelerator = (torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2)) for _ in range(2))
    assert all(isinstance(vars(ddp)["reducer"], dist.Reducer) for ddp in (reached, in_accelerator))
    trainer = types.SimpleNamespace(model_wrapped=reached, model=reached.module,
                                    accelerator=types.SimpleNamespace(_models=[in_accelerator]))
    assert is_distributed() and world_and_rank() == (1, 0)
    shutdown_distributed(trainer)
    assert not is_distributed() and world_and_rank() == (1, 0)
    for ddp in (reached, in_accelerator):
        assert "reducer" not in vars(ddp) and "logger" not in vars(ddp)


def test_shutdown_without_a_group_is_a_no_op():
    assert not dist.is_initialized()
    shutdown_distributed(object())
    assert not dist.is_initialized()

"""Two DDP processes (gloo, CPU, loopback): every rank unloads and re-initialises identically."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from toys import toy_peft

        from plora import PeriodicUnloader, PLoRAConfig

        model = toy_peft(targets=("up", "down"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        unloader = PeriodicUnloader(ddp, opt, PLoRAConfig(unload_every=2, momentum=1.0))
        torch.manual_seed(1000 + rank)  # ranks' global RNGs differ: re-init must not depend on them
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(6):
            tokens = torch.randint(0, 40, (4, 7), generator=g)
            ddp(tokens).square().mean().backward()
            opt.step()
            opt.zero_grad()
            unloader.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "unloads": unloader.num_unloads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_ranks_stay_identical_through_unloads(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["unloads"] == r1["unloads"] == 3
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # the unloads changed the base weights (they are not the initial ones)
    from toys import toy_peft

    init = toy_peft(targets=("up", "down")).state_dict()
    changed = [k for k in init if "base_layer.weight" in k and not torch.equal(init[k], r0["state"][k])]
    assert len(changed) == 2

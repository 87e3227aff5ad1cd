"""Where this process stands in a (possibly single-process) distributed run.

DeepSpeed needs the torch.distributed variables even for one process; a plain `python` or
`oml` process sets them itself (rank 0 of 1, loopback, a free port). Under the `deepspeed`
launcher (one or many machines, a hostfile) they are already set, and every rank reads its
own rank from them — nothing assumes it is rank 0.
"""

from __future__ import annotations

import os

from oml_core.localhost import free_port


def ensure_process_group_env() -> None:
    """Make a plain single process look like rank 0 of a world of 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_agree(flag: bool) -> bool:
    """True only if every rank says True (so all ranks stop at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())

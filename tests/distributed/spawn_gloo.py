"""Run tests/distributed on ``nprocs`` processes of torch.distributed with
gloo on localhost (torch.multiprocessing spawn), collectives timing out
after 60 s.  Exit status 0 when every rank passed.

    python tests/distributed/spawn_gloo.py 2
"""

import datetime
import os
import socket
import sys


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, nprocs, port, args):
    import pytest
    import torch.distributed as dist
    os.environ["NORMKIT_TEST_COMMUNICATOR"] = "torch"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=60))
    try:
        code = pytest.main(args)
        dist.barrier()  # every rank done before any tears its group down
    finally:
        dist.destroy_process_group()
    if code != 0:
        raise SystemExit(f"rank {rank}: pytest exited with {code}")


def main():
    import torch.multiprocessing as mp
    nprocs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    here = os.path.dirname(os.path.abspath(__file__))
    args = ["-q", "-p", "no:cacheprovider", here] + sys.argv[2:]
    mp.spawn(_rank, args=(nprocs, _free_port(), args), nprocs=nprocs,
             join=True)


if __name__ == "__main__":
    main()

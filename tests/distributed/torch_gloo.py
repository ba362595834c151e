"""Run the scenarios of tests/distributed/torch_sync_checks.py on
``nprocs`` processes of torch.distributed with gloo on localhost
(torch.multiprocessing spawn; collectives time out after 30 s).  Optional
further arguments keep only the scenarios whose id contains one of them.
Exit status 0 when every rank passed every scenario.

    python tests/distributed/torch_gloo.py 2
    python tests/distributed/torch_gloo.py 3 unequal bad_input
"""

import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rank(rank, nprocs, port, keep):
    sys.path.insert(0, HERE)
    import torch.distributed as dist
    from normkit import distributed
    from torch_sync_checks import SCENARIOS, scenario_id
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=30))
    try:
        comm = distributed.from_torch()
        for scenario in SCENARIOS:
            name = scenario_id(scenario)
            if keep and not any(k in name for k in keep):
                continue
            function, kwargs = scenario
            start = time.perf_counter()
            assert function(comm, **kwargs) is True, name
            print(f"rank {rank}/{nprocs}: ok {name} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        # every rank done before any tears its group down: one CI run saw
        # rank 0 (the store's host) abort in the teardown after every
        # scenario had passed on both ranks
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    sys.path.insert(0, HERE)
    import torch.multiprocessing as mp
    from spawn_gloo import _free_port
    nprocs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    mp.spawn(_rank, args=(nprocs, _free_port(), sys.argv[2:]), nprocs=nprocs,
             join=True)
    print(f"all {nprocs} ranks passed", flush=True)


if __name__ == "__main__":
    main()

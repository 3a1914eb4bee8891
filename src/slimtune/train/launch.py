"""`slimtune finetune --nproc-per-node N ...`: start N processes of the same command on this machine through torch's
elastic launcher (what `torchrun --standalone` runs), after checking here, in one line, what they would refuse. A
worker that stops on a one-line error (exit 2) makes this command exit 2 too, without torchrun's failure report."""
from __future__ import annotations

import logging
import os
import sys
import uuid


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m slimtune *argv` in `nproc` local processes (RANK, WORLD_SIZE, LOCAL_RANK set as torchrun
    sets them) and wait for them.

    Returns:
        0 when every process succeeded; 2 when one stopped on a user error (it printed the line); 130 when one was
        interrupted; 1 otherwise (a line names the process and its exit code).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:  # as torchrun: no oversubscribed CPU threads
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"slimtune-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its failure report repeats what the workers printed
    try:
        elastic_launch(config, sys.executable)("-m", "slimtune", *argv)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if 2 in codes.values() or 130 in codes.values():
            return 2 if 2 in codes.values() else 130
        # the launcher stops the others with SIGTERM (-15) once one fails: name the one that failed first
        rank, code = min(codes.items(), key=lambda rc: (rc[1] == -15, rc[0]))
        print(f"slimtune: process {rank} of {nproc} failed with exit code {code} (see its output above)",
              file=sys.stderr)
        return 1
    finally:
        quiet.setLevel(level)
    return 0

"""What the launcher (`accelerate launch`, torchrun, an MPI launch) tells this process through its environment: how
many processes it started and this one's rank, read where accelerate reads them, before anything heavy loads."""

from __future__ import annotations

import os

# torchrun's and accelerate's variables first, then those of an MPI launch (accelerate's `--mpirun_hostfile`)
WORLD_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANKS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launched_processes() -> int:
    """How many processes the launcher started this one among (1 when nothing launched it)."""
    return int(next((os.environ[name] for name in WORLD_SIZES if name in os.environ), "1"))


def is_main_process() -> bool:
    return int(next((os.environ[name] for name in RANKS if name in os.environ), "0")) == 0

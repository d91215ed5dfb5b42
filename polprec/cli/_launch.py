"""How many processes ``polprec run --devices`` asks for, and starting them with torchrun.

``fabric run`` counts ``--devices`` per node and starts the script through
``torch.distributed.run``; so does ``polprec run`` when that makes more than one process.
polprec does not place the script on a device: the script picks one (``cuda:LOCAL_RANK``, or
the CPU with gloo), so ``--accelerator`` only decides how ``--devices`` is counted and checked.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed.run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

__all__ = ["ACCELERATORS", "launch", "process_count"]

#: ``--accelerator`` values: Fabric's, less ``tpu`` (``fabric run`` cannot launch TPUs either).
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def _gpus(accelerator: str) -> tuple[str, int]:
    """What GPUs ``accelerator`` means on this machine, and how many of them it has."""
    mps = torch.backends.mps.is_available()
    if accelerator == "mps" or (accelerator == "gpu" and mps and not torch.cuda.is_available()):
        return "MPS device", int(mps)  # a Mac has one
    return "CUDA GPU", torch.cuda.device_count()


def _invalid(devices: str, accelerator: str) -> ValueError:
    accepted = "a number of processes >= 1 or 'auto' (1)"
    if accelerator == "cpu":
        accepted += " (-1, every GPU, needs --accelerator cuda, gpu or auto)"
    else:
        accepted += ", or -1 for every GPU of this node"
    if "," in devices or devices.strip().startswith("["):
        accepted += (
            "; polprec run does not pick GPUs by index: each process computes on the GPU of "
            "its LOCAL_RANK, so set CUDA_VISIBLE_DEVICES=1,3 and pass --devices 2"
        )
    return ValueError(f"invalid value {devices!r}: give {accepted}")


def process_count(devices: str, accelerator: str) -> int:
    """The number of processes ``--devices`` starts on this node, as ``fabric run`` counts them.

    ``auto`` is one process, a number N >= 1 is N processes and ``-1`` is every GPU of this
    node. With ``--accelerator cuda``, ``gpu`` or ``mps`` the GPUs must exist; with ``auto`` or
    ``cpu`` a number is a number of processes, whatever the script then computes on.

    Raises:
        ValueError: ``devices`` is no count this accelerator accepts; the message says which are.
    """
    text = devices.strip().lower()
    if text == "auto":
        return 1
    count = int(text) if text.isdigit() else None
    every_gpu = text == "-1" and accelerator != "cpu"
    if count == 0 or (count is None and not every_gpu):
        raise _invalid(devices, accelerator)
    if count is not None and accelerator in ("auto", "cpu"):
        return count
    kind, available = _gpus(accelerator)
    wanted = available if count is None else count
    if available == 0:
        raise ValueError(
            f"invalid value {devices!r}: --accelerator {accelerator} needs a {kind} and this "
            "machine has none; pass --accelerator cpu to start processes that need no GPU"
        )
    if wanted > available:
        raise ValueError(
            f"invalid value {devices!r}: it asks for {wanted} {kind}(s) and this machine has "
            f"{available}; pass at most {available}, or --accelerator cpu to start processes "
            "that need no GPU each"
        )
    return wanted


def launch(
    script: str,
    script_args: list[str],
    *,
    processes: int,
    num_nodes: int,
    node_rank: int,
    main_address: str,
    main_port: int,
) -> int:
    """Start ``script`` in ``processes`` processes on this node through ``torch.distributed.run``.

    Each process inherits this environment (``POLPREC_PRECISION`` included) and gets torchrun's
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.

    Returns:
        0 when every process succeeds, else the exit status of the first one that failed
        (``128 + N`` for a process killed by signal N, as a shell reports it).
    """
    # Fabric's default: share the cores between the processes, unless the user chose.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    argv = [
        f"--nproc-per-node={processes}",
        f"--nnodes={num_nodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={main_address}",
        f"--master-port={main_port}",
        "--",  # the script and its arguments, as written, even a leading `--`
        script,
        *script_args,
    ]
    try:
        torchrun.main(argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"exited with status {code}" if code > 0 else f"was killed by {failure.signal_name()}"
        print(f"polprec run: rank {rank} of {processes * num_nodes} {how}", file=sys.stderr)
        return code if code > 0 else 128 - code
    return 0

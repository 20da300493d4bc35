"""Fail fast instead of hanging: one rank's error ends that rank at once with a clear message.

A rank that raises (or dies) leaves the others blocked in their next collective. They are bounded
by the process-group timeout (`init_distributed(timeout_s=...)`) and, on gloo, usually fail at once
because the dead peer's sockets close; `exit_on_failure` turns whatever they raise into a one-line
diagnosis naming the rank and exits the process with status 1 (os._exit: a process group in an
error state can block interpreter shutdown). torchrun then stops the remaining workers.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

import torch.distributed as dist

_COLLECTIVE_HINTS = ("connection closed", "connection reset", "connection refused", "timed out", "timeout",
                     "broken pipe", "by peer", "watchdog")


def describe_failure(e: BaseException) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0][:300] if text else type(e).__name__
    collective = isinstance(e, dist.DistError) or any(h in text.lower() for h in _COLLECTIVE_HINTS)
    why = ("a collective failed or timed out: another rank has probably died or stalled (see its log)"
           if collective else "this rank raised")
    return f"moonlet.dist: rank {rank} of {world} is exiting: {why}. Cause: {first}"


@contextmanager
def exit_on_failure(exit_code: int = 1):
    """Run a distributed job body; on any exception print the traceback and a diagnosis, then exit."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - every failure must end the rank
        if isinstance(e, SystemExit):  # an intended exit (argparse, a CLI's return code): not a failure
            raise
        traceback.print_exc()
        print(describe_failure(e), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)

"""The process around every command (pretrain, sft, dpo, tools/generate.py, tools/evaluate.py): what a
user did wrong ends in one line on stderr and exit code 2, and the process group is always torn down.

A user error is an exception of one of USER_ERRORS, raised with a message that names the flag or the
file and what to do; anything else is a bug and keeps its traceback. Rank 0 prints it, and so does any
rank whose error carries ``report_on_this_rank`` (an error only some data-parallel replicas meet, which
rank 0 may not).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch.distributed as dist

from megatron_ds.checkpoint.format import CheckpointError
from megatron_ds.config import ConfigError
from megatron_ds.data.errors import DataError
from megatron_ds.parallel.topology import TopologyError

USER_ERRORS = (ConfigError, DataError, TopologyError, CheckpointError)


def run_command(body: Callable[[], None]) -> int:
    """Run ``body``; its exit code: 0, or 2 after one ``error: ...`` line (rank 0 only) for a user error."""
    try:
        body()
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", "0")) == 0 or getattr(e, "report_on_this_rank", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

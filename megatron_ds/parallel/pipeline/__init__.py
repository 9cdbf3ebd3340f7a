"""Pipeline parallelism: schedules as pure lists of actions, their executor, and the p2p between stages."""

from megatron_ds.parallel.pipeline.p2p import PipelineP2P
from megatron_ds.parallel.pipeline.schedules import (
    Action, build_schedule, interleaved_1f1b_schedule, no_pipelining_schedule, one_f_one_b_schedule, run_schedule,
)

__all__ = ["Action", "PipelineP2P", "build_schedule", "interleaved_1f1b_schedule", "no_pipelining_schedule",
           "one_f_one_b_schedule", "run_schedule"]

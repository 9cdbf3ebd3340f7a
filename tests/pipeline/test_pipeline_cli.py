"""What a user sees when a pipeline layout is wrong: one line naming the flag, exit code 2.

Each case runs ``python -m megatron_ds.pretrain`` with WORLD_SIZE set as torchrun would; the
checks run before any process group exists, so one process stands for the whole world.
"""

from tests.training.test_pretrain_cli import TINY, assert_one_line_error, pretrain

# TINY: 2 layers, --micro-batch-size 2 --global-batch-size 4.


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    # World 4 at PP 2: DP 2, so a global batch of 6 is not a whole number of micro-batches of 2 per DP rank.
    args = TINY + ["--global-batch-size", "6", "--mock-data", "--pipeline-model-parallel-size", "2"]
    proc = pretrain(args, env={"WORLD_SIZE": "4"})
    assert_one_line_error(proc, "--global-batch-size 6", "--micro-batch-size 2", "data-parallel size 2")


def test_too_few_microbatches_for_the_interleaved_schedule():
    # 4 layers on PP 2 with 1 layer per virtual stage: 2 chunks per rank; a global batch of 2 is 1
    # micro-batch, not a multiple of the 2 stages.
    args = TINY + ["--mock-data", "--num-layers", "4", "--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "2"]
    proc = pretrain(args, env={"WORLD_SIZE": "2"})
    assert_one_line_error(proc, "1 micro-batches", "--num-layers-per-virtual-pipeline-stage 1",
                          "multiple of --pipeline-model-parallel-size 2")


def test_layer_split_that_does_not_add_up():
    args = TINY + ["--mock-data", "--num-layers", "7", "--pipeline-model-parallel-size", "3",
                   "--pipeline-layer-split", "3,2,1"]
    proc = pretrain(args, env={"WORLD_SIZE": "3"})
    assert_one_line_error(proc, "--pipeline-layer-split 3,2,1", "6 layers", "--num-layers 7")


def test_uneven_stages_without_a_flag_name_the_fix():
    proc = pretrain(TINY + ["--mock-data", "--num-layers", "7", "--pipeline-model-parallel-size", "3"],
                    env={"WORLD_SIZE": "3"})
    assert_one_line_error(proc, "--pipeline-model-parallel-size 3", "--pipeline-layer-split")

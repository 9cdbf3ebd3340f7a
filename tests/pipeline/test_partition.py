"""Stage partitioning: layer counts per stage, model chunks, and the 67B model's uneven split."""

import pytest

from megatron_ds.config import ConfigError, ParallelConfig, count_parameters, model_preset
from megatron_ds.model.partition import (
    check_pipeline_config, describe_split, rank_chunk_ranges, stage_layer_counts, stage_parameter_counts,
)


def _pp(pp, **kw):
    return ParallelConfig(pipeline_model_parallel_size=pp, **kw)


def test_even_split():
    assert stage_layer_counts(8, _pp(4)) == [2, 2, 2, 2]
    assert rank_chunk_ranges(8, _pp(4), 3) == [range(6, 8)]


def test_first_and_last_stage_counts():
    assert stage_layer_counts(95, _pp(8, decoder_first_pipeline_num_layers=11)) == [11] + [12] * 7
    assert stage_layer_counts(95, _pp(8, decoder_last_pipeline_num_layers=11)) == [12] * 7 + [11]
    assert stage_layer_counts(7, _pp(3, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=2)) \
        == [1, 4, 2]


def test_explicit_split():
    assert stage_layer_counts(7, _pp(3, pipeline_layer_split="3,2,2")) == [3, 2, 2]
    assert rank_chunk_ranges(7, _pp(3, pipeline_layer_split="3,2,2"), 1) == [range(3, 5)]


def test_virtual_chunks_are_virtual_stages_c_times_p_plus_r():
    par = _pp(2, num_layers_per_virtual_pipeline_stage=2)
    assert rank_chunk_ranges(8, par, 0) == [range(0, 2), range(4, 6)]
    assert rank_chunk_ranges(8, par, 1) == [range(2, 4), range(6, 8)]


@pytest.mark.parametrize("layers,par,needle", [
    (95, _pp(8), "--pipeline-model-parallel-size 8 does not divide --num-layers 95 into equal stages"),
    (4, _pp(3), "--pipeline-layer-split (e.g. 1,1,2)"),  # said "leaves 4 of --num-layers 4 for 3 other stage(s)"
    (3, _pp(8), "--pipeline-model-parallel-size 8 exceeds --num-layers 3"),
    (95, _pp(8, decoder_first_pipeline_num_layers=10),
     "with --decoder-first-pipeline-num-layers 10, the other 7 stage(s) get 85 of --num-layers 95, which does not "
     "split evenly; pick counts that leave a multiple of 7"),
    (4, _pp(2, decoder_first_pipeline_num_layers=5), "--decoder-first-pipeline-num-layers 5: more layers than"),
    (4, _pp(2, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=2),
     "3 layers on 2 stage(s), not --num-layers 4"),
    (4, _pp(3, decoder_first_pipeline_num_layers=0), "--decoder-first-pipeline-num-layers: every pipeline stage"),
    (7, _pp(3, pipeline_layer_split="3,2,1"), "--pipeline-layer-split 3,2,1 adds up to 6 layers, not --num-layers 7"),
    (7, _pp(3, pipeline_layer_split="3,4"), "has 2 stages"),
    (7, _pp(3, pipeline_layer_split="3,x,2"), "--pipeline-layer-split"),
    (7, _pp(3, pipeline_layer_split="7,0,0"), "at least one layer"),
    (8, _pp(2, pipeline_layer_split="4,4", decoder_first_pipeline_num_layers=4), "excludes"),
])
def test_split_that_does_not_add_up_names_the_flag(layers, par, needle):
    with pytest.raises(ConfigError) as e:
        stage_layer_counts(layers, par)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("layers,par,m,needle", [
    (8, _pp(4, num_layers_per_virtual_pipeline_stage=1), 6, "needs a multiple of --pipeline-model-parallel-size 4"),
    (8, _pp(1, num_layers_per_virtual_pipeline_stage=1), 4, "needs --pipeline-model-parallel-size > 1"),
    (8, _pp(4, num_layers_per_virtual_pipeline_stage=3), 4, "does not divide --num-layers 8"),
    (8, _pp(4, num_layers_per_virtual_pipeline_stage=2), 4, "one chunk per rank"),
    (8, _pp(2, num_layers_per_virtual_pipeline_stage=2, decoder_first_pipeline_num_layers=4), 4, "even split"),
])
def test_interleaving_rules(layers, par, m, needle):
    with pytest.raises(ConfigError) as e:
        check_pipeline_config(layers, par, m)
    assert needle in str(e.value)


def test_67b_on_meta_tp8_pp8_uneven_split_sums_to_67_43b():
    # 95 layers divide by no stage count but 5 and 19: 11 on the first stage (it also holds the
    # embedding), 12 on each of the other seven (the last also holds the final norm and LM head).
    cfg = model_preset("deepseek-67b")
    par = _pp(8, tensor_model_parallel_size=8, decoder_first_pipeline_num_layers=11)
    stages = stage_parameter_counts(cfg, 8, par)  # every TP rank of every stage built on the meta device
    print("\ndeepseek-67b TP8 x PP8:\n" + describe_split(stages, 67_425_001_472))
    assert [sum(len(r) for r in s["layers"]) for s in stages] == [11] + [12] * 7
    total = sum(s["parameters"] for s in stages)
    assert total == count_parameters(cfg) == 67_425_001_472
    assert f"{total / 1e9:.2f}B" == "67.43B"
    # Middle stages hold 12 identical layers; the first one fewer layer but the embedding.
    assert len({s["parameters"] for s in stages[1:-1]}) == 1

"""The DeepSeek-LLM decoder as plain modules handed their tensor-parallel layers."""

from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.model.hf_names import load_hf_state_dict, shard_hf_state_dict_for_tp, to_hf_state_dict
from megatron_ds.model.param_count import count_model_parameters, presets_on_meta

__all__ = ["DeepSeekModel", "load_hf_state_dict", "to_hf_state_dict", "shard_hf_state_dict_for_tp",
           "count_model_parameters", "presets_on_meta"]

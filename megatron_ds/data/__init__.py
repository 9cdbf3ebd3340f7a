"""Data path: tokenizer, Megatron .bin/.idx corpora, GPT samples, data-parallel sampling."""

from megatron_ds.data.blending import (BlendedDataset, build_blending_indices,
                                       build_train_valid_test_datasets, parse_data_path)
from megatron_ds.data.errors import DataError
from megatron_ds.data.gpt_dataset import GPTDataset, parse_split, split_document_ids
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megatron_ds.data.sampler import MegatronPretrainingSampler, collate
from megatron_ds.data.tokenizer import Tokenizer, build_tokenizer, pad_vocab_size

__all__ = [
    "BlendedDataset", "DataError", "GPTDataset", "build_blending_indices", "parse_data_path", "IndexedDataset", "IndexedDatasetBuilder",
    "MegatronPretrainingSampler", "Tokenizer", "best_dtype", "build_tokenizer",
    "build_train_valid_test_datasets", "collate", "pad_vocab_size", "parse_split",
    "split_document_ids",
]

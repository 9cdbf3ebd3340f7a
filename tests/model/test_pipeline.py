"""Pipeline stages chained by hand compute what the whole model computes."""

import torch

from megatron_ds.model.deepseek import DeepSeekModel
from tests.model.hf_reference import BATCH, SEQ, model_config


def test_two_stages_chained_equal_the_whole_model():
    cfg = model_config("gqa", 1000)
    whole = DeepSeekModel(cfg, seed=3)
    first = DeepSeekModel(cfg, seed=3, post_process=False, layer_range=range(0, 1))
    last = DeepSeekModel(cfg, seed=3, pre_process=False, layer_range=range(1, 2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    with torch.no_grad():
        hidden = first(input_ids=ids)
        assert hidden.shape == (SEQ, BATCH, cfg.hidden_size)  # sequence-first between stages
        loss = last(hidden_states=hidden, labels=labels)
        ref = whole(input_ids=ids, labels=labels)
        logits = last(hidden_states=hidden)
    assert loss.shape == (BATCH, SEQ) and loss.dtype == torch.float32
    # Same ops in the same order on the same weights: bitwise equal.
    assert torch.equal(loss, ref)
    assert logits.shape == (BATCH, SEQ, cfg.padded_vocab_size(1))


def test_explicit_position_ids_equal_the_default():
    cfg = model_config("mha")
    model = DeepSeekModel(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids), model(input_ids=ids, position_ids=pos))
        shifted = model(input_ids=ids, position_ids=pos + 5)
    assert not torch.equal(shifted, model(input_ids=ids))

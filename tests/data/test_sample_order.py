"""Which samples a run reads, and in what order, as the requested sample count changes.

The shuffle is a permutation of every sample of the epochs the run needs (megatron-core's
GPTDataset), and a run reads its first num_samples entries. So:

- a longer run whose samples fit in the same number of epochs (with the same separate-last-epoch
  decision) reads the shorter run's samples first, in the same order: extending --train-iters on
  resume continues the data, it does not repeat any of it;
- a short run draws its samples from across the whole epoch, not from a contiguous chunk of the
  document-shuffled stream.

Corpus: 177 documents of 50-150 tokens (17,663 tokens, 551 samples of 32 per epoch).
"""

import contextlib
import io

import numpy as np
import pytest

from megatron_ds.data.gpt_dataset import GPTDataset
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ds.data.sampler import MegatronPretrainingSampler

NUM_DOCS, SEQ = 177, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("order") / "c")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(NUM_DOCS):
        builder.add_document(rng.integers(1, 500, size=int(rng.integers(50, 151))))
    builder.finalize(f"{prefix}.idx")
    return prefix


def dataset(prefix, num_samples, seed=1234, seq_length=SEQ):
    return GPTDataset(IndexedDataset(prefix), np.arange(NUM_DOCS), num_samples, seq_length, seed)


def documents_of_sample(ds, i):
    """The document ids whose tokens item i reads."""
    s = ds.shuffle_index[i]
    first, last = ds.sample_index[s][0], ds.sample_index[s + 1][0]
    return set(ds.document_index[first:last + 1].tolist())


def tokens_of(ds, n):
    return [ds[i]["tokens"].tolist() for i in range(n)]


@pytest.mark.parametrize("short,long,epochs", [
    (20, 40, 1),      # --train-iters 20 and 40 at global batch 1
    (160, 320, 1),    # 20 and 40 steps at global batch 8
    (1, 551, 1),      # down to a single sample, up to the whole epoch
    (600, 700, 2),    # two epochs, the second used for < 80%: shuffled on its own in both
    (1000, 1100, 2),  # two epochs, the second used for >= 80%: one shuffle of both in both
])
def test_a_longer_run_in_the_same_epochs_starts_with_the_shorter_runs_samples(corpus, short, long,
                                                                              epochs):
    a, b = dataset(corpus, short), dataset(corpus, long)
    assert a.num_epochs == b.num_epochs == epochs
    assert a.separate_final_epoch == b.separate_final_epoch
    # The indices do not depend on the sample count at all; the items are a prefix.
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert tokens_of(a, short) == tokens_of(b, short)
    # And the longer run's extra samples are new ones: no sample is read twice within an epoch.
    first_epoch = min(long, a.num_indexed_samples)
    assert len(set(b.shuffle_index[:first_epoch].tolist())) == first_epoch


def test_extending_train_iters_on_resume_continues_without_repeats(corpus):
    """A 20-step run at global batch 8 (2 ranks x 4), resumed from its end with --train-iters 40:
    the 160 samples after the resume are exactly the uninterrupted 40-step run's steps 21-40, and
    none of them is one of the first 160 (the old index repeated 77 of them)."""
    mbs, dp = 4, 2

    def steps(ds, consumed, n):
        out = []
        samplers = [iter(MegatronPretrainingSampler(len(ds), consumed, mbs, r, dp)) for r in range(dp)]
        for _ in range(n):
            out.append([int(ds.shuffle_index[i]) for s in samplers for i in next(s)])
        return out

    short, long = dataset(corpus, 20 * 8), dataset(corpus, 40 * 8)
    before = steps(short, 0, 20)
    after = steps(long, 20 * 8, 20)
    assert before + after == steps(long, 0, 40)
    seen = {s for step in before for s in step}
    assert not seen & {s for step in after for s in step}


def test_a_short_run_draws_samples_from_across_the_whole_epoch(corpus):
    """20 samples of 32 tokens are 640 stream tokens: as a contiguous chunk of the document stream
    they would touch 6 of the 177 documents (what the old index gave). Drawn from the 551 samples
    of the epoch, they touch 24, spread over the stream."""
    ds = dataset(corpus, 20)
    assert ds.num_indexed_samples == 551 and len(ds) == 20
    touched = set().union(*(documents_of_sample(ds, i) for i in range(20)))
    contiguous = set(ds.document_index[ds.sample_index[0][0]:ds.sample_index[20][0] + 1].tolist())
    assert len(contiguous) <= 8
    assert len(touched) >= 20, len(touched)
    # From across the epoch: the samples drawn lie in every fifth of the stream.
    fifths = {int(s) * 5 // ds.num_indexed_samples for s in ds.shuffle_index[:20]}
    assert fifths == set(range(5))


def test_order_changes_only_where_megatron_core_changes_it(corpus):
    """The prefix property holds within one (num_epochs, separate_final_epoch). Across epoch counts
    the document shuffle covers more epochs, so the order changes, as in megatron-core: 551 samples
    fit one epoch, 552 need a second."""
    one, two = dataset(corpus, 551), dataset(corpus, 552)
    assert (one.num_epochs, two.num_epochs) == (1, 2) and two.separate_final_epoch
    # The separate last epoch keeps the first epoch's documents and samples where they were; only
    # the permutation differs, its RNG having drawn the last epoch's document shuffle first.
    np.testing.assert_array_equal(one.document_index, two.document_index[:NUM_DOCS])
    assert sorted(two.shuffle_index[:551].tolist()) == list(range(551))
    assert not np.array_equal(one.shuffle_index, two.shuffle_index[:551])


def _train(prefix, cache, extra):
    """pretrain.run in-process on one rank over ``prefix``; (stream ids of the training samples
    read, in order; the log)."""
    from megatron_ds.config import config_from_args
    from megatron_ds.parallel.topology import single_process_state
    from megatron_ds.pretrain import build_datasets, run

    flags = ["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
             "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "512",
             "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
             "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3",
             "--data-path", prefix, "--split", "1", "--data-cache-path", cache,
             "--log-interval", "1000", "--no-async-save", "--no-fused-kernels"]
    read = []

    def build_data(cfg, tokenizer):
        train_ds, valid_ds = build_datasets(cfg, tokenizer)

        class Recording(type(train_ds)):  # still a GPTDataset to the trainer
            def __getitem__(self, i):
                read.append(int(self.shuffle_index[i]))
                return super().__getitem__(i)

        train_ds.__class__ = Recording
        return train_ds, valid_ds

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run(config_from_args(flags + extra), single_process_state(), log=True, build_data=build_data)
    return read, log.getvalue()


def test_trainer_resumed_with_more_train_iters_reads_the_longer_runs_batches(corpus, tmp_path):
    """--train-iters 4 with a save, then --load with --train-iters 8: the samples the trainer reads
    after the resume are those of an uninterrupted 8-step run's steps 5-8, none was read before the
    resume, and nothing is said about the data order."""
    cache, ckpt = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    before, _ = _train(corpus, cache, ["--train-iters", "4", "--save", ckpt])
    after, log = _train(corpus, cache, ["--train-iters", "8", "--load", ckpt])
    uninterrupted, _ = _train(corpus, cache, ["--train-iters", "8"])
    assert len(before) == len(after) == 32
    assert before + after == uninterrupted
    assert not set(before) & set(after)
    assert "resumed from" in log and "another order" not in log


def test_resume_into_more_epochs_warns_that_samples_may_repeat(tmp_path):
    """A corpus of 40 samples per epoch: 4 steps of 8 fit one epoch, 8 steps need two, and the
    two-epoch index orders the first epoch's samples differently (megatron-core's too). The resume
    says so, since samples read before it come again."""
    prefix = str(tmp_path / "small")
    rng = np.random.default_rng(1)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(13):
        builder.add_document(rng.integers(1, 500, size=100))
    builder.finalize(f"{prefix}.idx")
    small = GPTDataset(IndexedDataset(prefix), np.arange(13), 32, SEQ, seed=1234)
    assert small.num_indexed_samples == 40  # 13 x 100 tokens
    cache, ckpt = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    before, _ = _train(prefix, cache, ["--train-iters", "4", "--save", ckpt])
    after, log = _train(prefix, cache, ["--train-iters", "8", "--load", ckpt])
    assert ("warning: the training samples are in another order than in the checkpoint's run (32 "
            "samples took 1 epoch(s), 64 take 2, the last shuffled on its own)") in log, log
    assert set(before) & set(after)  # what the warning is about


def test_order_change_per_corpus_of_a_blend(tmp_path):
    from megatron_ds.data.blending import build_train_valid_test_datasets, order_change

    prefixes = []
    for k, docs in enumerate((177, 13)):
        prefixes.append(str(tmp_path / f"c{k}"))
        rng = np.random.default_rng(k)
        builder = IndexedDatasetBuilder(f"{prefixes[-1]}.bin", np.uint16)
        for _ in range(docs):
            builder.add_document(rng.integers(1, 500, size=100))
        builder.finalize(f"{prefixes[-1]}.idx")

    def blend(n):
        return build_train_valid_test_datasets(["0.5", prefixes[0], "0.5", prefixes[1]], "1", SEQ,
                                               1234, (n, 0, 0))[0]

    # 40 samples an epoch in the small corpus: 80 blended samples take 40 of it, 100 take 50.
    assert order_change(blend(64), 40, 40) is None
    assert order_change(blend(80), 64, 64) is None
    why = order_change(blend(100), 80, 80)
    assert why == f"corpus 1 ({prefixes[1]}): 40 samples took 1 epoch(s), 50 take 2, the last " \
                  f"shuffled on its own"
    assert order_change(blend(100), 80, 0) is None  # nothing read yet

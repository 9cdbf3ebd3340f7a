"""Throughput of tools/preprocess_data.py beside a plain baseline, and the sample-index build time.

    python benchmarks/preprocess.py                 # ~200 MB corpus, workers 1 and 2
    python benchmarks/preprocess.py --mb 20 --workers 1 2 4

1. Generates a jsonl corpus of about --mb MB (Zipf-distributed synthetic words, digits,
   punctuation and some CJK, documents of 20..4000 words) and trains a 32k byte-level BPE on a
   slice of it with tools/train_tokenizer.py (or takes --tokenizer-model).
2. Baseline, in this process: the same tokenizer in a plain single-process loop (json.loads, encode,
   append EOD) writing with megatron-core's IndexedDatasetBuilder.
3. tools/preprocess_data.py --workers N for each N, as a subprocess (start-up included).
   Prints MB/s (uncompressed input), tokens/s and the ratio to the baseline, and checks that every
   run wrote the same tokens as the baseline.
4. tools/preprocess_sft.py the same way: conversations made of the corpus's text (--sft-mb MB,
   a user turn and an assistant reply each), against a plain single-process loop that renders
   each with the same chat template; checks the bytes written are the baseline's.
5. The sample index of 1e9 tokens (documents of lognormal length, mean ~600 tokens, seq 4096):
   the C++ walk (megatron_ds._C_data) against the NumPy build, each the best of 3.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(path: str, target_mb: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 11, size=50000)
    vocab = ["".join(rng.choice(letters, size=n)) for n in lengths]
    vocab[:40] = ["的", "数据", "模型", "训练", "世界", ",", ".", ";", ":", "(", ")", "!", "?",
                  "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on",
                  "def", "return", "self", "import", "class", "\n", "\n\n", "-", "=", "+", "/",
                  "\"", "'", "x", "y"]
    vocab = np.array(vocab, dtype=object)
    target = int(target_mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n_words = int(rng.integers(20, 4000))
            words = vocab[np.minimum(rng.zipf(1.2, size=n_words), len(vocab)) - 1]
            text = " ".join(words)
            if rng.random() < 0.3:
                text += f" {int(rng.integers(0, 10**9))}"
            line = json.dumps({"text": text, "meta": {"source": "bench"}}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def baseline(corpus: str, tokenizer_path: str, prefix: str):
    """Plain single-process loop writing with megatron-core's IndexedDatasetBuilder."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron_ds.data.indexed_dataset import best_dtype
    from megatron_ds.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_path)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=best_dtype(tok.vocab_size).type)
    tokens = 0
    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [tok.eod]
            builder.add_item(torch.tensor(ids))
            builder.end_document()
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - start, tokens


def ours(corpus: str, tokenizer_path: str, prefix: str, workers: int):
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-model", tokenizer_path, "--append-eod",
           "--workers", str(workers), "--progress-interval", "1e9"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    from megatron_ds.data.indexed_dataset import IndexedDataset

    return seconds, int(IndexedDataset(prefix + "_text_document").sequence_lengths.astype(np.int64).sum())


def same_tokens(prefix_a: str, prefix_b: str) -> bool:
    return all(open(prefix_a + ext, "rb").read() == open(prefix_b + ext, "rb").read()
               for ext in (".bin", ".idx"))


def make_conversations(corpus: str, path: str, target_mb: float) -> int:
    """Conversations cut from the corpus's documents: the first words ask, the rest reply."""
    written = 0
    with open(corpus, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as f:
        for line in src:
            words = json.loads(line)["text"].split(" ")
            cut = max(1, min(len(words) // 4, 200))
            record = {"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                   {"role": "assistant", "content": " ".join(words[cut:]) or "ok"}]}
            out = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(out)
            written += len(out.encode("utf-8"))
            if written >= target_mb * 1e6:
                break
    return written


def sft_baseline(path: str, tokenizer_path: str, prefix: str):
    """Plain single-process loop: parse, render with the DeepSeek template, write both datasets."""
    from megatron_ds.data.chat import get_template, messages_from_record, render
    from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
    from megatron_ds.data.tokenizer import build_tokenizer

    tok, template = build_tokenizer(tokenizer_path), get_template("deepseek")
    builders = [IndexedDatasetBuilder(prefix + "_tokens.bin", best_dtype(tok.vocab_size)),
                IndexedDatasetBuilder(prefix + "_loss_mask.bin", np.uint8)]
    tokens = 0
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids, mask = render(messages_from_record(json.loads(line)), tok, template)
            builders[0].add_document(np.asarray(ids, dtype=np.int64))
            builders[1].add_document(np.asarray(mask, dtype=np.uint8))
            tokens += len(ids)
    builders[0].finalize(prefix + "_tokens.idx")
    builders[1].finalize(prefix + "_loss_mask.idx")
    return time.perf_counter() - start, tokens


def sft_ours(path: str, tokenizer_path: str, prefix: str, workers: int):
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_sft.py"), "--input", path,
           "--output-prefix", prefix, "--tokenizer-model", tokenizer_path, "--workers", str(workers),
           "--progress-interval", "1e9"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    from megatron_ds.data.indexed_dataset import IndexedDataset

    return seconds, int(IndexedDataset(prefix + "_tokens").sequence_lengths.astype(np.int64).sum())


def bench_sample_index(total_tokens: float = 1e9, seq_length: int = 4096):
    from megatron_ds.data import sample_index

    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(6.0, 1.0, size=int(total_tokens / 600 * 1.05)), 1, 2**20).astype(np.int32)
    document_index = np.arange(len(sizes), dtype=np.int64)
    rng.shuffle(document_index)
    total = int(sizes.astype(np.int64).sum())
    num_samples = (min(total, int(total_tokens)) - 1) // seq_length
    results = {}
    for name, use_cpp in (("C++", True), ("NumPy", False)):
        if use_cpp and sample_index._C_data is None:
            results[name] = None
            continue
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            rows = sample_index.build_sample_index(sizes, document_index, seq_length, num_samples,
                                                   use_cpp=use_cpp)
            best = min(best, time.perf_counter() - start)
        results[name] = (best, rows)
    if results["C++"] is not None:
        assert np.array_equal(results["C++"][1], results["NumPy"][1])
    return len(sizes), num_samples, {k: (v[0] if v else None) for k, v in results.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=200.0, help="corpus size in MB")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sft-mb", type=float, default=50.0, help="SFT conversations in MB (0: skip)")
    p.add_argument("--tokenizer-model", default=None, help="default: train a 32k BPE on 5 MB of the corpus")
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, for baseline and workers

    work = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    start = time.perf_counter()
    size = make_corpus(corpus, args.mb)
    print(f"corpus: {corpus}, {size / 1e6:.1f} MB, generated in {time.perf_counter() - start:.0f}s")
    tok_path = args.tokenizer_model
    if tok_path is None:
        sample = os.path.join(work, "sample.jsonl")
        with open(corpus, "rb") as src, open(sample, "wb") as dst:
            dst.write(b"".join(src.readlines(5_000_000)))
        from tools import train_tokenizer

        tok_path = os.path.join(work, "tokenizer.json")
        if train_tokenizer.main(["--input", sample, "--vocab-size", "32000", "--output", tok_path]) != 0:
            raise RuntimeError("train_tokenizer failed")
    print(f"os.cpu_count() = {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} "
          "(cores shared with other processes: numbers are indicative)")

    base_s, base_tokens = baseline(corpus, tok_path, os.path.join(work, "baseline"))
    rows = [("baseline (1 process, megatron-core builder)", base_s, base_tokens, True,
             os.getloadavg()[0])]
    for n in args.workers:
        prefix = os.path.join(work, f"ours{n}")
        seconds, tokens = ours(corpus, tok_path, prefix, n)
        rows.append((f"preprocess_data.py --workers {n}", seconds, tokens,
                     same_tokens(prefix + "_text_document", os.path.join(work, "baseline")),
                     os.getloadavg()[0]))
    # The load average at the end of each run shows how much the cores were shared meanwhile.
    print(f"\n{'':46s} {'seconds':>8s} {'MB/s':>7s} {'tokens/s':>11s} {'x baseline':>10s} "
          f"same tokens  load avg")
    for name, seconds, tokens, same, load in rows:
        print(f"{name:46s} {seconds:8.1f} {size / seconds / 1e6:7.2f} {tokens / seconds:11,.0f} "
              f"{base_s / seconds:10.2f} {str(same):11s} {load:9.1f}")

    if args.sft_mb > 0:
        conversations = os.path.join(work, "conversations.jsonl")
        sft_size = make_conversations(corpus, conversations, args.sft_mb)
        base_s, base_tokens = sft_baseline(conversations, tok_path, os.path.join(work, "sft_baseline"))
        rows = [("SFT baseline (1 process, render loop)", base_s, base_tokens, True, os.getloadavg()[0])]
        for n in args.workers:
            prefix = os.path.join(work, f"sft{n}")
            seconds, tokens = sft_ours(conversations, tok_path, prefix, n)
            same = all(same_tokens(prefix + part, os.path.join(work, "sft_baseline") + part)
                       for part in ("_tokens", "_loss_mask"))
            rows.append((f"preprocess_sft.py --workers {n}", seconds, tokens, same, os.getloadavg()[0]))
        print(f"\nSFT conversations: {sft_size / 1e6:.1f} MB")
        print(f"{'':46s} {'seconds':>8s} {'MB/s':>7s} {'tokens/s':>11s} {'x baseline':>10s} "
              f"same bytes  load avg")
        for name, seconds, tokens, same, load in rows:
            print(f"{name:46s} {seconds:8.1f} {sft_size / seconds / 1e6:7.2f} {tokens / seconds:11,.0f} "
                  f"{base_s / seconds:10.2f} {str(same):11s} {load:9.1f}")

    num_docs, num_samples, times = bench_sample_index()
    print(f"\nsample index of 1e9 tokens ({num_docs:,} documents, {num_samples:,} samples of 4096):")
    for name, seconds in times.items():
        print(f"  {name:6s} " + (f"{seconds * 1e3:8.1f} ms" if seconds is not None else "not built"))
    if times.get("C++"):
        print(f"  NumPy / C++ = {times['NumPy'] / times['C++']:.2f}")


if __name__ == "__main__":
    main()

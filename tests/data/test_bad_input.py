"""Bad input ends in one clear line naming the file (and line) and what to do."""

import json
import os
import struct

import numpy as np
import pytest

from megatron_ds.config import Config, ConfigError, DataConfig, ModelConfig
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.pretrain import load_tokenizer
from tools import preprocess_data

GOOD = [{"text": f"document number {i}"} for i in range(5)]


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line).encode("utf-8")
                    if not isinstance(line, bytes) else line)
            f.write(b"\n")
    return path


def bad_corpus(tmp_path):
    # Lines 1-2 good, 3 malformed JSON, 4 good, 5 not UTF-8, 6 missing key, 7 good.
    return write_lines(tmp_path / "in.jsonl", [GOOD[0], GOOD[1], '{"text": "unterminated',
                                               GOOD[2], b'{"text": "caf\xe9"}', {"body": "x"},
                                               GOOD[3]])


def run(tmp_path, tokenizer_json, *extra, src=None):
    return preprocess_data.main(["--input", str(src or bad_corpus(tmp_path)), "--output-prefix",
                                 str(tmp_path / "out"), "--tokenizer-model", str(tokenizer_json),
                                 *extra])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_skip_bad_lines_reports_counts_and_lists_every_one(tmp_path, tokenizer_json, capsys,
                                                           workers):
    run(tmp_path, tokenizer_json, "--skip-bad-lines", "--workers", workers)
    out, err = capsys.readouterr()
    src = tmp_path / "in.jsonl"
    assert f"warning: skipped {src}:3: invalid JSON" in err
    assert f"warning: skipped {src}:5: not UTF-8 (byte 0xe9 at column 14)" in err
    assert f"warning: skipped {src}:6: no string field 'text'; pick the field with --json-keys" in err
    assert "4 documents" in out and "3 bad lines skipped" in out
    listed = (tmp_path / "out_bad_lines.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in listed] == [f"{src}:3", f"{src}:5", f"{src}:6"]
    tok = build_tokenizer(str(tokenizer_json))
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [d.tolist() for d in ds] == [tok.encode(GOOD[i]["text"]) for i in (0, 1, 2, 3)]


def fatal(tmp_path, tokenizer_json, lines, capsys):
    src = write_lines(tmp_path / "in.jsonl", lines)
    assert run(tmp_path, tokenizer_json, src=src) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    msg = err[0]
    assert msg.startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing half-written is left
    return msg, src


def test_non_utf8_line_is_fatal_by_default(tmp_path, tokenizer_json, capsys):
    msg, src = fatal(tmp_path, tokenizer_json, [GOOD[0], b'{"text": "\xff\xfe"}'], capsys)
    assert f"{src}:2: not UTF-8" in msg and "--skip-bad-lines" in msg


def test_malformed_json_is_fatal_by_default(tmp_path, tokenizer_json, capsys):
    msg, src = fatal(tmp_path, tokenizer_json, [GOOD[0], GOOD[1], "{oops"], capsys)
    # json's own words plus where: its message alone ("Expecting property name enclosed in double
    # quotes") does not say which character
    assert f"{src}:3: invalid JSON (Expecting property name enclosed in double quotes at column 2)" in msg
    assert "--skip-bad-lines" in msg


def test_missing_key_is_fatal_by_default(tmp_path, tokenizer_json, capsys):
    msg, src = fatal(tmp_path, tokenizer_json, [{"text": 5}], capsys)
    assert f"{src}:1: no string field 'text'" in msg


def test_truncated_gzip_is_an_error(tmp_path, tokenizer_json, capsys):
    import gzip

    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"line {i} " * 20}) + "\n")
    raw = (tmp_path / "in.jsonl.gz").read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    assert run(tmp_path, tokenizer_json, src=tmp_path / "in.jsonl.gz") == 2
    assert "in.jsonl.gz: unreadable after line" in capsys.readouterr().err


def test_progress_line_on_stderr(tmp_path, tokenizer_json, capsys):
    src = write_lines(tmp_path / "in.jsonl", GOOD * 50)
    run(tmp_path, tokenizer_json, "--progress-interval", "0", "--block-bytes", "512", src=src)
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if "docs/s" in line]
    assert progress and all("MB/s" in line and "ETA" in line for line in progress)
    assert progress[-1].startswith("100.0% | 250 docs")
    assert "docs/s" not in out and "250 documents" in out and "tokens/s" in out


def write_idx(tmp_path, docs=([1, 2, 3], [4, 5])):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(str(tmp_path / "d.idx"))
    return str(tmp_path / "d")


def patch_idx(prefix, offset, raw):
    data = bytearray(open(prefix + ".idx", "rb").read())
    data[offset:offset + len(raw)] = raw
    open(prefix + ".idx", "wb").write(bytes(data))


def test_wrong_version(tmp_path):
    prefix = write_idx(tmp_path)
    patch_idx(prefix, 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"d\.idx: index version 2, only version 1"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("code", [0, 9, 255])
def test_unknown_dtype_code(tmp_path, code):
    prefix = write_idx(tmp_path)
    patch_idx(prefix, 17, bytes([code]))
    with pytest.raises(DataError, match=rf"d\.idx: unknown dtype code {code}"):
        IndexedDataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = write_idx(tmp_path)
    raw = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(raw[:-2])
    with pytest.raises(DataError, match=r"d\.bin: 8 bytes but .*d\.idx indexes 10; the \.bin is truncated"):
        IndexedDataset(prefix)


def test_truncated_idx(tmp_path):
    prefix = write_idx(tmp_path)
    raw = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(raw[:-8])
    with pytest.raises(DataError, match=r"d\.idx: .*truncated or corrupt"):
        IndexedDataset(prefix)


def test_tokenizer_larger_than_the_model_vocabulary(tokenizer_json):
    vocab = build_tokenizer(str(tokenizer_json)).vocab_size
    cfg = Config(model=ModelConfig(vocab_size=vocab - 1), data=DataConfig(tokenizer_model=str(tokenizer_json)))
    with pytest.raises(ConfigError, match=rf"has {vocab} tokens, more than the model's vocabulary of "
                                          rf"{vocab - 1}; pass --vocab-size {vocab}"):
        load_tokenizer(cfg)
    cfg.model.vocab_size = vocab
    assert load_tokenizer(cfg).vocab_size == vocab


@pytest.mark.parametrize("tool", ["train_tokenizer", "preprocess_data", "merge_datasets"])
def test_unwritable_output_is_one_line_before_any_work(tool, tmp_path, corpus_jsonl, tokenizer_json, capsys):
    """An output under a regular file (or in /proc) is found before tokenizing or training, not after."""
    from tools import merge_datasets, train_tokenizer

    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "out")
    argv, main = {
        "train_tokenizer": (["--input", str(corpus_jsonl), "--vocab-size", "300", "--output", bad + ".json"],
                            train_tokenizer.main),
        "preprocess_data": (["--input", str(corpus_jsonl), "--tokenizer-model", str(tokenizer_json),
                             "--output-prefix", bad], preprocess_data.main),
        "merge_datasets": (["--input", write_idx(tmp_path), "--output-prefix", bad], merge_datasets.main),
    }[tool]
    before = sorted(os.listdir(tmp_path))
    assert main(argv) == 2
    msg = capsys.readouterr().err.strip()
    flag = "--output" if tool == "train_tokenizer" else "--output-prefix"
    assert msg.startswith(f"error: {flag} {bad}") and "is not a directory" in msg and "\n" not in msg, msg
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "file").read_text() == "x"
    assert main(argv[:-1] + ["/proc/megatron-ds-x/out"]) == 2
    assert "cannot be created in /proc" in capsys.readouterr().err


def test_a_fatal_error_after_skipped_lines_leaves_no_list_either(tmp_path, tokenizer_json, capsys):
    """--skip-bad-lines writes {prefix}_bad_lines.txt beside the outputs: published with them, never alone."""
    import gzip

    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write("{oops\n")
        for i in range(2000):
            f.write(json.dumps({"text": f"line {i} " * 20}) + "\n")
    raw = (tmp_path / "in.jsonl.gz").read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    assert run(tmp_path, tokenizer_json, "--skip-bad-lines", src=tmp_path / "in.jsonl.gz") == 2
    assert "unreadable after line" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.jsonl.gz"]

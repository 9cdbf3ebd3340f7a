import gzip
import json
import os

import numpy as np
import pytest

from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.tokenizer import build_tokenizer
from tools import preprocess_data

TEXTS = ["hello, world! 12345", "", "你好世界\nsecond line", "the quick brown fox " * 20, "x"]


def write_jsonl(path, records, raw_lines=()):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


@pytest.mark.parametrize("suffix,workers", [(".jsonl", 1), (".jsonl.gz", 1), (".jsonl", 2)])
def test_end_to_end_with_eod(tmp_path, tokenizer_json, capsys, suffix, workers):
    src = write_jsonl(tmp_path / f"in{suffix}", [{"text": t} for t in TEXTS])
    prefix = tmp_path / "out" / "corpus"
    preprocess_data.main(["--input", str(src), "--output-prefix", str(prefix),
                          "--tokenizer-model", str(tokenizer_json), "--append-eod",
                          "--workers", str(workers)])
    tok = build_tokenizer(str(tokenizer_json))
    ds = IndexedDataset(f"{prefix}_text_document")
    assert ds.dtype == np.uint16
    assert len(ds) == len(TEXTS)  # the empty text still gets its EOD
    for i, text in enumerate(TEXTS):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod]
    out = capsys.readouterr().out
    assert f"{len(TEXTS)} documents" in out and "0 empty documents skipped" in out


def test_empty_documents_skipped_without_eod(tmp_path, tokenizer_json, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "title": "t"} for t in TEXTS],
                      raw_lines=[""])  # a trailing blank line is not a document
    prefix = tmp_path / "corpus"
    preprocess_data.main(["--input", str(src), "--output-prefix", str(prefix),
                          "--tokenizer-model", str(tokenizer_json),
                          "--json-keys", "text", "title"])
    tok = build_tokenizer(str(tokenizer_json))
    ds = IndexedDataset(f"{prefix}_text_document")
    assert [d.tolist() for d in ds] == [tok.encode(t) for t in TEXTS if t]
    assert len(IndexedDataset(f"{prefix}_title_document")) == len(TEXTS)
    assert "1 empty documents skipped" in capsys.readouterr().out


def test_glob_inputs_concatenate_in_sorted_order(tmp_path, tokenizer_json):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    preprocess_data.main(["--input", str(tmp_path / "*.jsonl"), "--output-prefix",
                          str(tmp_path / "c"), "--tokenizer-model", str(tokenizer_json)])
    tok = build_tokenizer(str(tokenizer_json))
    ds = IndexedDataset(str(tmp_path / "c_text_document"))
    assert [d.tolist() for d in ds] == [tok.encode("first"), tok.encode("second")]


def run_error(argv, capsys):
    assert preprocess_data.main(argv) == 2  # the exit code of every command's bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_input(tmp_path, tokenizer_json, capsys):
    missing = tmp_path / "nope.jsonl"
    msg = run_error(["--input", str(missing), "--output-prefix", str(tmp_path / "o"),
                     "--tokenizer-model", str(tokenizer_json)], capsys)
    assert str(missing) in msg and "--input" in msg
    assert os.listdir(tmp_path) == []


def test_missing_tokenizer(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    msg = run_error(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                     "--tokenizer-model", str(tmp_path / "tok.json")], capsys)
    assert "tok.json" in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_line_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_json, capsys,
                                                              workers):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}] * 300, raw_lines=["{oops"])
    msg = run_error(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                     "--tokenizer-model", str(tokenizer_json), "--workers", str(workers)], capsys)
    assert f"{src}:301:" in msg and "invalid JSON" in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_missing_key_names_the_flag(tmp_path, tokenizer_json, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"content": "a"}])
    msg = run_error(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                     "--tokenizer-model", str(tokenizer_json)], capsys)
    assert f"{src}:1:" in msg and "--json-keys" in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_script_runs_from_repo_root(tmp_path, tokenizer_json):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    missing = tmp_path / "nope.jsonl"
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(missing),
                        "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
                        str(tokenizer_json)], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --input {missing}: no such file"

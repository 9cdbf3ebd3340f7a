import hashlib
import json
import os

import pytest

from megatron_ds.data.errors import DataError
from megatron_ds.data.tokenizer import build_tokenizer, pad_vocab_size
from tools import train_tokenizer


def test_digits_are_single_tokens(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_special_tokens_first_and_found_by_name(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    assert (tok.bos, tok.eod, tok.pad) == (0, 1, 2)
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    names = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert names == {name: i for i, name in enumerate(train_tokenizer.SPECIAL_TOKENS)}


def test_encode_adds_no_special_tokens_and_round_trips(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    text = "  hello, world!\n\n你好世界 x=1; unseen-word ÆØÅ 🙂 42\t"
    ids = tok.encode(text)
    assert tok.eod not in ids and tok.bos not in ids
    assert tok.decode(ids) == text


def test_newline_and_cjk_do_not_merge_with_words(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    pieces = [tok.decode([i]) for i in tok.encode("world\nhello你好")]
    assert all(("\n" not in p or p == "\n") for p in pieces)
    assert not any(("你" in p or "好" in p) and any(c.isascii() for c in p) for p in pieces)


def test_vocab_size_counts_special_tokens(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    # The trainer stores the special tokens in the BPE vocab too; a small corpus runs out of
    # merges before --vocab-size 512.
    assert tok.vocab_size == len(vocab["model"]["vocab"]) <= 512
    assert max(vocab["model"]["vocab"].values()) == tok.vocab_size - 1


def test_directory_path_and_identity(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json.parent))
    assert tok.path == str(tokenizer_json)
    assert tok.identity() == hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()[:16]


def test_missing_and_corrupt_tokenizer_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no-such.json"):
        build_tokenizer(str(tmp_path / "no-such.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=str(bad)) as e:
        build_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)


def test_pad_vocab_size():
    assert pad_vocab_size(102400, 1) == 102400
    assert pad_vocab_size(100015, 1) == 100096
    assert pad_vocab_size(100015, 8) == 100352  # 98 * 1024
    assert pad_vocab_size(1, 2) == 256
    assert pad_vocab_size(512, 3) == 768


def test_train_tokenizer_output_directory(tmp_path, corpus_jsonl, capsys):
    train_tokenizer.main(["--input", str(corpus_jsonl), "--vocab-size", "300",
                          "--output", str(tmp_path / "tok")])
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert "padded model vocab (TP=1) 384" in capsys.readouterr().out


def test_train_tokenizer_reports_padded_vocab_for_tp_and_special_ids(tmp_path, corpus_jsonl, capsys):
    train_tokenizer.main(["--input", str(corpus_jsonl), "--vocab-size", "300", "--output",
                          str(tmp_path / "tok"), "--tensor-model-parallel-size", "4"])
    out = capsys.readouterr().out
    assert "padded model vocab (TP=4) 512" in out  # 300 rounded up to a multiple of 128 * 4
    assert "<｜end▁of▁sentence｜>=1" in out


def test_train_tokenizer_non_utf8_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    assert train_tokenizer.main(["--input", str(src), "--vocab-size", "300", "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not UTF-8" in err[0] and str(src) in err[0], err
    assert not (tmp_path / "t").exists()  # no tokenizer.json, not even its directory


@pytest.mark.parametrize("argv,needle", [
    (["--vocab-size", "100"], "--vocab-size 100: must be at least 259 (256 bytes + special tokens)"),
    (["--input", "/nonexistent/x.jsonl"], "--input /nonexistent/x.jsonl: no such file"),
], ids=["vocab-too-small", "missing-input"])
def test_train_tokenizer_bad_input_is_one_line_exit_2(tmp_path, corpus_jsonl, capsys, argv, needle):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = {"--input": str(corpus_jsonl), "--vocab-size": "300", "--output": str(tmp_path / "tok.json")}
    args.update(dict(zip(argv[::2], argv[1::2])))
    r = subprocess.run([sys.executable, "tools/train_tokenizer.py", *[x for kv in args.items() for x in kv]],
                       cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 2 and r.stderr.strip() == f"error: {needle}", r.stderr
    assert not (tmp_path / "tok.json").exists()

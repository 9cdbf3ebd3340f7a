"""tools/preprocess_sft.py: what it writes equals the chat template's rendering, and bad input is one
clear line (exit 2, no output left behind) or, with --skip-bad-conversations, counted skips."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ds.data.chat import messages_from_record, render
from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.tokenizer import build_tokenizer
from tests.sft.conftest import make_conversations, write_jsonl
from tools import preprocess_sft

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_outputs_are_the_rendered_conversations(tmp_path, chat_tokenizer, capsys):
    records = make_conversations(20)
    write_jsonl(tmp_path / "a.jsonl", records)
    assert preprocess_sft.main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "out"),
                                "--tokenizer-model", str(chat_tokenizer)]) == 0
    tok = build_tokenizer(chat_tokenizer)
    ids_ds, mask_ds = IndexedDataset(str(tmp_path / "out_tokens")), IndexedDataset(str(tmp_path / "out_loss_mask"))
    assert len(ids_ds) == len(mask_ds) == ids_ds.num_documents == 20
    assert mask_ds.dtype == np.uint8 and ids_ds.dtype == np.uint16  # 300-token vocabulary
    for i, r in enumerate(records):
        ids, mask = render(messages_from_record(r), tok)
        assert ids_ds[i].tolist() == ids and mask_ds[i].tolist() == mask
    out = capsys.readouterr().out
    assert "20 conversations" in out and "0 bad conversations" in out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_chatml_template_is_selectable(tmp_path, chat_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_conversations(3))
    assert preprocess_sft.main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "out"),
                                "--tokenizer-model", str(chat_tokenizer), "--chat-template", "chatml"]) == 0
    tok = build_tokenizer(chat_tokenizer)
    assert "<|im_start|>assistant\n" in tok.decode(IndexedDataset(str(tmp_path / "out_tokens"))[0])


def cli(tmp_path, tokenizer, *extra):
    return subprocess.run([sys.executable, "tools/preprocess_sft.py", "--input", str(tmp_path / "in.jsonl"),
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(tokenizer), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))


GOOD = json.dumps({"prompt": "what is 1 plus 2?", "response": "3."})
BAD = [
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}),
     "message 2 has unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}),
     "message 1 (user) has empty content"),
    (json.dumps({"prompt": "hi", "response": " "}), "message 2 (assistant) has empty content"),
    (json.dumps({"text": "plain pretraining text"}), "neither \"messages\" nor \"prompt\" and \"response\""),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=["no-assistant", "unknown-role", "empty-user", "empty-reply",
                                                  "no-conversation", "not-json"])
def test_bad_line_is_one_line_error_naming_file_and_line(tmp_path, chat_tokenizer, line, reason):
    write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, line, GOOD])
    proc = cli(tmp_path, chat_tokenizer)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {tmp_path / 'in.jsonl'}:3: ") and reason in err, err
    assert "--skip-bad-conversations" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing published, no temporary files left


def test_skip_flag_counts_reports_and_lists_the_bad_lines(tmp_path, chat_tokenizer):
    lines = [GOOD] + [line for line, _ in BAD] + [GOOD, BAD[0][0]]
    write_jsonl(tmp_path / "in.jsonl", lines)
    proc = cli(tmp_path, chat_tokenizer, "--skip-bad-conversations")
    assert proc.returncode == 0, proc.stderr
    assert "2 conversations" in proc.stdout and "7 bad conversations skipped" in proc.stdout, proc.stdout
    assert "2 the conversation has no assistant turn" in proc.stdout  # counted by reason
    listed = (tmp_path / "out_bad_conversations.txt").read_text().splitlines()
    assert [ln.split(": ", 1)[0] for ln in listed] == [f"{tmp_path / 'in.jsonl'}:{n}" for n in (2, 3, 4, 5, 6, 7, 9)]
    assert proc.stderr.count("warning: skipped") == 7
    assert len(IndexedDataset(str(tmp_path / "out_tokens"))) == 2


def test_all_bad_is_an_error_even_when_skipping(tmp_path, chat_tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [BAD[0][0]])
    proc = cli(tmp_path, chat_tokenizer, "--skip-bad-conversations")
    assert proc.returncode == 2 and "no usable conversation (all skipped)" in proc.stderr, proc.stderr
    assert not (tmp_path / "out_tokens.idx").exists()


def test_unknown_template_and_missing_input_are_one_line(tmp_path, chat_tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [GOOD])
    proc = cli(tmp_path, chat_tokenizer, "--chat-template", "vicuna")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --chat-template 'vicuna' is not known; choose one of deepseek, chatml")
    os.remove(tmp_path / "in.jsonl")
    proc = cli(tmp_path, chat_tokenizer)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --input {tmp_path / 'in.jsonl'}: no such file"


def test_workers_and_blocks_do_not_change_the_output(tmp_path, chat_tokenizer):
    """--workers 2 over many small blocks writes the same bytes (and the same bad-line list, in file
    order) as one process over one block."""
    records = [json.dumps(r) for r in make_conversations(60)]
    lines = records[:25] + [BAD[0][0], BAD[5][0]] + records[25:] + [BAD[1][0]]
    write_jsonl(tmp_path / "in.jsonl", lines)
    outputs = {}
    for name, extra in (("one", ["--workers", "1"]), ("two", ["--workers", "2", "--block-bytes", "700"])):
        prefix = tmp_path / name
        assert preprocess_sft.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(prefix),
                                    "--tokenizer-model", str(chat_tokenizer), "--skip-bad-conversations",
                                    *extra]) == 0
        outputs[name] = {suffix: (tmp_path / f"{name}{suffix}").read_bytes()
                         for suffix in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx",
                                        "_bad_conversations.txt")}
    assert outputs["one"] == outputs["two"]
    assert len(IndexedDataset(str(tmp_path / "two_tokens"))) == 60
    listed = outputs["two"]["_bad_conversations.txt"].decode().splitlines()
    assert [ln.split(": ", 1)[0].rsplit(":", 1)[1] for ln in listed] == ["26", "27", "63"]


def test_bad_line_with_workers_is_the_same_one_line_error(tmp_path, chat_tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [GOOD] * 30 + [BAD[0][0]] + [GOOD] * 30)
    proc = cli(tmp_path, chat_tokenizer, "--workers", "2", "--block-bytes", "200")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {tmp_path / 'in.jsonl'}:31: ") and "no assistant turn" in err, err
    assert err.endswith("(or pass --skip-bad-conversations)"), err
    assert os.listdir(tmp_path) == ["in.jsonl"]

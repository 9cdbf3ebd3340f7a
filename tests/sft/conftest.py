"""Shared SFT test data: a byte-level BPE tokenizer trained on chat text and a writer of conversation jsonl."""

import json
import random

import pytest

NAMES = "alice bob carol dave erin frank".split()


def make_conversations(n, seed=0, long_every=0):
    """n conversations (messages, and every third as prompt/response), some multi-turn, some with a
    system prompt; with long_every k, every k-th has a long first reply (truncation cases)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        name = rng.choice(NAMES)
        reply = f"{a} plus {b} is {a + b}."
        if long_every and i % long_every == 0:
            reply = " ".join([reply] * 6)
        if i % 3 == 0:
            out.append({"prompt": f"what is {a} plus {b}?", "response": reply})
            continue
        messages = [{"role": "system", "content": f"you are {name}."}] if i % 3 == 1 else []
        messages += [{"role": "user", "content": f"what is {a} plus {b}?"}, {"role": "assistant", "content": reply}]
        if rng.random() < 0.5:
            messages += [{"role": "user", "content": "and twice that?"},
                         {"role": "assistant", "content": f"twice is {2 * (a + b)}."}]
        out.append({"messages": messages})
    return out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """Path of a 300-token byte-level BPE tokenizer.json (BOS, EOS, PAD specials) trained on chat text."""
    from megatron_ds.data.chat import render  # noqa: F401 - fail early if the module is broken
    from tools import train_tokenizer

    d = tmp_path_factory.mktemp("chat_tok")
    lines = []
    for r in make_conversations(200, seed=1):
        msgs = r.get("messages") or [{"content": r["prompt"]}, {"content": r["response"]}]
        lines.append({"text": "User: Assistant: " + " ".join(m["content"] for m in msgs)})
    write_jsonl(d / "text.jsonl", lines)
    assert train_tokenizer.main(["--input", str(d / "text.jsonl"), "--vocab-size", "300", "--output", str(d / "tok.json")]) == 0
    return d / "tok.json"

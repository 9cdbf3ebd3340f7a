import json
import random

import pytest

WORDS = ("the quick brown fox jumps over a lazy dog while data flows through model layers "
         "tokens attention 你好 世界 数据 模型 hello, world! (note) x=1; price: 12345.").split()


def make_documents(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
            + f"\n{rng.randint(0, 10**6)}" for _ in range(n)]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in make_documents(400):
            f.write(json.dumps({"text": text, "id": 0}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory, corpus_jsonl):
    from tools import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(corpus_jsonl), "--vocab-size", "512",
                                 "--output", str(out)]) == 0
    return out

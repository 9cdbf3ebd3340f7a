"""A small preference dataset with a learnable rule, for examples/dpo_tiny.sh and the DPO tests.

Each prompt asks to count up from a digit (modulo 10); the chosen reply does ("count up from 7: 7 8 9 0 1"),
the rejected reply breaks the rule once: two neighbouring numbers swapped, one skipped or one repeated.
Every reply is plausible token by token, so a model has to learn the increment to prefer the chosen
one. A third of the prompts are chat messages (a system line, or an earlier exchange) instead of a string.

    python examples/dpo_pairs.py --output pairs.jsonl --pairs 2000 --valid-output valid.jsonl \
        --text-output corpus.txt      # corpus.txt: all the text, for tools/train_tokenizer.py
"""

import argparse
import json
import random


def count_up(start: int, n: int) -> list[int]:
    return [(start + i) % 10 for i in range(n)]


def broken(seq: list[int], rng: random.Random) -> list[int]:
    """``seq`` with the rule broken once, somewhere after its first number."""
    out = list(seq)
    i = rng.randrange(1, len(seq) - 1)
    kind = rng.choice(("swap", "skip", "repeat"))
    if kind == "swap":
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "skip":
        out[i:] = [(x + 1) % 10 for x in out[i:]]
    else:
        out[i:] = [out[i - 1]] + out[i:-1]
    return out


def make_pair(rng: random.Random) -> dict:
    start, n = rng.randrange(10), rng.randrange(5, 9)
    good = count_up(start, n)
    bad = broken(good, rng)
    question = f"count up from {start}, {n} numbers"
    style = rng.randrange(3)
    if style == 0:
        prompt = question
    elif style == 1:
        prompt = [{"role": "system", "content": "Answer with numbers only."}, {"role": "user", "content": question}]
    else:
        s0 = rng.randrange(10)
        prompt = [{"role": "user", "content": f"count up from {s0}, 3 numbers"},
                  {"role": "assistant", "content": " ".join(map(str, count_up(s0, 3)))},
                  {"role": "user", "content": question}]
    return {"prompt": prompt, "chosen": " ".join(map(str, good)), "rejected": " ".join(map(str, bad))}


def write(path: str, pairs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="training pairs (jsonl)")
    ap.add_argument("--pairs", type=int, default=2000, help="training pairs to write")
    ap.add_argument("--valid-output", help="also write held-out pairs here (jsonl)")
    ap.add_argument("--valid-pairs", type=int, default=256, help="held-out pairs to write")
    ap.add_argument("--text-output", help="also write every prompt and reply as plain text, for a tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    train = [make_pair(rng) for _ in range(args.pairs)]
    write(args.output, train)
    valid = [make_pair(rng) for _ in range(args.valid_pairs)] if args.valid_output else []
    if args.valid_output:
        write(args.valid_output, valid)
    if args.text_output:
        with open(args.text_output, "w", encoding="utf-8") as f:
            for p in train:
                msgs = [{"content": p["prompt"]}] if isinstance(p["prompt"], str) else p["prompt"]
                for text in [m["content"] for m in msgs] + [p["chosen"], p["rejected"]]:
                    f.write(f"User: {text}\n\nAssistant: {text}\n")
    print(f"wrote {len(train)} pairs to {args.output}" + (f", {len(valid)} to {args.valid_output}" if valid else ""))


if __name__ == "__main__":
    main()

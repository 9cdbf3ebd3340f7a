"""Synthetic chat data with a learnable rule, for examples/sft_tiny.sh.

Each conversation asks for a sum of two numbers and gets it spelled out ("12 plus 30 is 42."); half
go on with a follow-up turn ("and minus 5?" -> "42 minus 5 is 37."). A third carry a system line, a
third are written as {"prompt", "response"} pairs instead of {"messages"}. The replies repeat the
operands and add them digit by digit, so a small model's loss on them falls steadily as it learns.

    python examples/sft_conversations.py --output train.jsonl --conversations 3000 \
        --valid-output valid.jsonl --text-output corpus.txt   # corpus.txt: for tools/train_tokenizer.py
"""

import argparse
import json
import random

PERSONAS = ("a careful calculator", "a patient teacher", "a terse assistant")


def make_conversation(rng: random.Random, follow_up_only: bool = False) -> dict:
    a, b = rng.randrange(100), rng.randrange(100)
    question, reply = f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    style = rng.randrange(3)
    if style == 0 and not follow_up_only:
        return {"prompt": question, "response": reply}
    messages = [{"role": "system", "content": f"you are {rng.choice(PERSONAS)}."}] if style == 1 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if follow_up_only or rng.random() < 0.5:
        c = rng.randrange(10)
        messages += [{"role": "user", "content": f"and minus {c}?"},
                     {"role": "assistant", "content": f"{a + b} minus {c} is {a + b - c}."}]
    return {"messages": messages}


def texts(record: dict):
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [record["prompt"], record["response"]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="training conversations, jsonl")
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--follow-up-only", action="store_true",
                   help="only multi-turn conversations (messages with a follow-up), e.g. for a second stage")
    p.add_argument("--valid-output", help="held-out conversations, jsonl")
    p.add_argument("--valid-conversations", type=int, default=128)
    p.add_argument("--text-output", help="all the text plus the template's words, one line each, for a tokenizer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    outputs = [(args.output, args.conversations)]
    if args.valid_output:
        outputs.append((args.valid_output, args.valid_conversations))
    text = open(args.text_output, "w", encoding="utf-8") if args.text_output else None
    for path, n in outputs:
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                r = make_conversation(rng, args.follow_up_only)
                f.write(json.dumps(r) + "\n")
                if text is not None:
                    text.write(json.dumps({"text": "User: Assistant: " + "\n\n".join(texts(r))}) + "\n")
    if text is not None:
        text.close()


if __name__ == "__main__":
    main()

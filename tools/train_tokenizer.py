"""Train a DeepSeek-style byte-level BPE tokenizer.json on text or jsonl files.

    python tools/train_tokenizer.py --input data/*.jsonl --vocab-size 32000 --output tok/

Special tokens take ids 0, 1, 2: <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>,
<｜pad▁of▁sentence｜>. (DeepSeek's released tokenizer puts them after the BPE vocabulary, at
100000+; only the ids differ, the wrapper finds them by name.) Bad input is one ``error: ...`` line
on stderr and exit code 2.
"""

import argparse
import json
import os
import sys

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.data.corpus_files import expand_inputs, is_jsonl, open_text
from megatron_ds.data.tokenizer import pad_vocab_size
from megatron_ds.errors import ConfigError
from megatron_ds.paths import check_writable_file

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad▁of▁sentence｜>"]

# Pieces that BPE may merge within but never across, applied in order (each splits the pieces
# left by the one before): newlines alone; runs of CJK; words with at most one leading space;
# punctuation/symbol runs with at most one leading space. Then digits one by one, so numbers are
# spelled digit by digit, and finally the byte-level mapping (its own regex off: we split above).
PIECE_PATTERNS = [
    r"[\r\n]",
    r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]+",
    r" ?[\p{L}\p{M}]+",
    r" ?[\p{P}\p{S}]+",
]


def new_tokenizer():
    """An untrained byte-level BPE with the DeepSeek-style pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PIECE_PATTERNS]
        + [pre_tokenizers.Digits(individual_digits=True),
           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def iter_texts(files, json_keys):
    """Documents of jsonl files (one per key per line) and lines of text files, streamed."""
    for path in files:
        with open_text(path) as f:
            for line_no, line in _numbered_lines(f, path):
                if not is_jsonl(path):
                    yield line
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
                for key in json_keys:
                    if isinstance(record, dict) and isinstance(record.get(key), str):
                        yield record[key]


def _numbered_lines(f, path):
    line_no = 0
    try:
        for line_no, line in enumerate(f, start=1):
            yield line_no, line
    except UnicodeDecodeError:
        # Text mode decodes ahead in blocks, so the bad line is somewhere after the last one read.
        raise ValueError(f"{path}: not UTF-8 (after line {line_no}); re-encode the file as UTF-8") from None


def output_file(output: str) -> str:
    """--output is a .json file, or a directory (created when the tokenizer is saved) that gets
    tokenizer.json; checked writable here, before training, not after it."""
    if not (output.endswith(".json") and not os.path.isdir(output)):
        output = os.path.join(output, "tokenizer.json")
    check_writable_file(output, "--output")
    return output


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="text files (.txt, one line = one piece of text) and/or jsonl files, "
                        "globs allowed, optionally .gz")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to train on")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="tokens including the special tokens")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    p.add_argument("--output", default="tokenizer.json", help="tokenizer.json path or directory")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="for the padded-vocabulary report: the trainer's flag of the same name")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="for the padded-vocabulary report: the TP size you will train with")
    args = p.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {args.vocab_size}: must be at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    return args


def main(argv=None) -> int:
    """Exit code 0, or 2 after one ``error: ...`` line on stderr (bad input; no tokenizer.json written)."""
    try:
        return train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(args) -> int:
    from tokenizers import pre_tokenizers, trainers

    files = expand_inputs(args.input)
    path = output_file(args.output)  # checked before training, not after it
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte encodable: no <unk>
    tok.train_from_iterator(iter_texts(files, args.json_keys), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)  # a reader never sees a half-written tokenizer.json
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tp = args.tensor_model_parallel_size
    padded = pad_vocab_size(vocab_size, tp, args.make_vocab_size_divisible_by)
    ids = ", ".join(f"{t}={tok.token_to_id(t)}" for t in SPECIAL_TOKENS)
    print(f"wrote {path}: vocab size {vocab_size}, padded model vocab (TP={tp}) {padded} "
          f"(--vocab-size {vocab_size} for the trainer); special tokens {ids}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

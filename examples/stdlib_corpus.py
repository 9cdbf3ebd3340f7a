"""Write a jsonl corpus from the Python standard library's own source files.

Every machine that runs Python has them, so the tiny demo needs no download:

    python examples/stdlib_corpus.py --output corpus.jsonl --max-mb 4
"""

import argparse
import json
import os
import sysconfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="jsonl file to write ({'text': ...} per source file)")
    p.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of text")
    args = p.parse_args(argv)
    root = sysconfig.get_paths()["stdlib"]
    budget = int(args.max_mb * 1e6)
    written = docs = 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
            for name in sorted(filenames):
                if not name.endswith(".py") or written >= budget:
                    continue
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    out.write(json.dumps({"text": text}) + "\n")
                    written += len(text)
                    docs += 1
    os.replace(tmp, args.output)  # never leave a half-written corpus under the final name
    print(f"wrote {docs} documents, {written / 1e6:.1f} MB of Python source from {root} to {args.output}")


if __name__ == "__main__":
    main()

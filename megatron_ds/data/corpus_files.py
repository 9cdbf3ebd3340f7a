"""Finding and streaming raw corpus files (.jsonl, .json, .txt, each optionally .gz)."""

import glob
import gzip
import os


def expand_inputs(patterns: list[str], flag: str = "--input") -> list[str]:
    """Files named by patterns (paths or globs), in the order given, globs sorted.

    Raises FileNotFoundError with a one-line message when a pattern matches nothing.
    """
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{flag} {pattern}: no such file")
        files.extend(matches)
    return files


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


def open_text(path: str):
    """A UTF-8 text stream, gunzipped on the fly for .gz; never reads the whole file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")

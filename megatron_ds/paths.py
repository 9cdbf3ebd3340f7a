"""Output paths checked when a command starts, not when it first writes after hours of work.

    check_writable_dir(cfg.training.save, "--save")        # a directory there, or one that can be made
    check_writable_file(args.output_json, "--output-json") # a file whose directory is (or can be) there

Each check writes (and removes) a probe file: permission bits say nothing for root, a read-only
mount or /proc, so only a write tells. Nothing is created: a directory that does not exist yet is
probed in its nearest existing ancestor. A failure is one ConfigError naming the flag.
"""

from __future__ import annotations

import os
import tempfile

from megatron_ds.errors import ConfigError


def _probe(directory: str) -> None:
    """Create and remove a file in ``directory``; raises OSError when that is not possible."""
    fd, path = tempfile.mkstemp(prefix=".megatron_ds-write-probe-", dir=directory)
    os.close(fd)
    os.remove(path)


def check_writable_dir(path: str, flag: str) -> None:
    """``path`` is a directory this process can write in, or one it can create; else a ConfigError
    ``"{flag} {path}: ..."`` saying why and what to do."""
    target = os.path.abspath(path)
    if os.path.lexists(target) and not os.path.exists(target):
        raise ConfigError(f"{flag} {path}: a broken symbolic link; remove it or pass another directory")
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ConfigError(f"{flag} {path}: exists and is not a directory; pass a directory (new or existing)")
        try:
            _probe(target)
        except OSError as e:
            raise ConfigError(f"{flag} {path}: directory is not writable ({e.strerror}); "
                              "pass a directory you can write to") from None
        return
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"{flag} {path}: cannot be created, {ancestor} is not a directory; pass another path")
    try:
        _probe(ancestor)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be created in {ancestor} ({e.strerror}); "
                          "pass a directory you can write to") from None


def check_writable_file(path: str, flag: str) -> None:
    """``path`` can be written (replaced, when it exists): not a directory, in a directory that is
    writable or can be created; else a ConfigError naming ``flag``."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ConfigError(f"{flag} {path}: is a directory; pass a file name")
    check_writable_dir(os.path.dirname(target), f"{flag} {path}: its directory")


def check_output_prefix(prefix: str, flag: str) -> None:
    """The directory of an output prefix (``{prefix}_text_document.bin`` ...) is writable or creatable."""
    check_writable_dir(os.path.dirname(os.path.abspath(prefix)), f"{flag} {prefix}: its directory")

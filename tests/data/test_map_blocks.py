"""binarize.map_blocks, the block pipeline of tools/preprocess_data.py and tools/preprocess_sft.py:
with workers, a worker that cannot start or dies ends the run with one error line, never a wait
for a result that will not come (multiprocessing.Pool respawns such workers forever)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FailingEncoder:
    """An encoder whose setup fails in every worker process (as a missing tokenizer would there)."""

    user_errors = ()

    def __init__(self, marker):
        raise RuntimeError(f"setup failed ({marker})")


class DyingEncoder:
    """An encoder whose worker process is killed by the first block it gets (as the OOM killer would)."""

    user_errors = ()

    def encode(self, path, first_line_no, block):
        os._exit(9)


SCRIPT = """
import sys
from megatron_ds.data.binarize import InputError, map_blocks
from tests.data.test_map_blocks import {cls}
if __name__ == "__main__":
    try:
        list(map_blocks([sys.argv[1]], {cls}, {args}, 2, 16))
    except InputError as e:
        print(f"error: {{e}}")
        sys.exit(2)
"""


def _run(tmp_path, cls, args):
    (tmp_path / "in.jsonl").write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(40)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(cls=cls, args=args))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "in.jsonl")], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))


def test_a_worker_that_cannot_start_is_one_error(tmp_path):
    proc = _run(tmp_path, "FailingEncoder", "('x',)")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("error: a --workers process exited unexpectedly"), proc.stdout
    assert "--workers 1" in proc.stdout


def test_a_worker_that_dies_is_one_error(tmp_path):
    proc = _run(tmp_path, "DyingEncoder", "()")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("error: a --workers process exited unexpectedly"), proc.stdout

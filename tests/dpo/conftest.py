import pytest

from tests.dpo.helpers import make_dpo_files


@pytest.fixture(scope="session")
def dpo_files(tmp_path_factory):
    """(train pairs jsonl, valid pairs jsonl, tokenizer.json) from examples/dpo_pairs.py's counting rule."""
    return make_dpo_files(tmp_path_factory.mktemp("dpo"))

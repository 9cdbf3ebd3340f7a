"""What pretrain / sft / dpo check at startup, before any process group or training: the output
directories (--save, --tensorboard-dir), a --load without a checkpoint, and a checkpoint trained with
another tokenizer. Each failure is one ``error:`` line naming the flag, exit code 2, nothing written.

In-process calls of each entry point's ``main`` (the checks run before torch.distributed starts);
the runs that do train are 2 steps of a 1-layer model on mock data.
"""

import os

import pytest

from megatron_ds import dpo, pretrain, sft

TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", "64", "--seq-length", "16", "--max-position-embeddings", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--log-interval", "1", "--no-async-save",
        "--no-fused-kernels", "--mock-data"]
MAINS = {"pretrain": pretrain.main, "sft": sft.main, "dpo": dpo.main}


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _tokenizer(path, words):
    """A word-level tokenizer.json (with an end-of-document token); other ``words``, another tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))
    return str(path)


def _error(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _tree(root):
    """Every path under root with its size: what 'nothing written, nothing lost' compares."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = os.path.getsize(os.path.join(d, f))
    return out


# --- B3: --save and --tensorboard-dir -------------------------------------------------------------


@pytest.mark.parametrize("entry", sorted(MAINS))
def test_save_at_a_regular_file_fails_at_startup(entry, tmp_path, capsys):
    f = tmp_path / "ckpt"
    f.write_text("precious")
    err = _error(MAINS[entry], TINY + ["--train-iters", "2", "--save", str(f)], capsys)
    assert err == f"error: --save {f}: exists and is not a directory; pass a directory (new or existing)"
    assert f.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_that_cannot_be_created_fails_at_startup(tmp_path, capsys):
    err = _error(pretrain.main, TINY + ["--train-iters", "2", "--save", "/proc/megatron-ds-x/ckpt"], capsys)
    assert err.startswith("error: --save /proc/megatron-ds-x/ckpt: cannot be created in /proc")
    (tmp_path / "file").write_text("")
    err = _error(pretrain.main, TINY + ["--train-iters", "2", "--save", str(tmp_path / "file" / "ckpt")], capsys)
    assert f"--save {tmp_path / 'file' / 'ckpt'}: cannot be created, {tmp_path / 'file'} is not a directory" in err


def test_tensorboard_dir_at_a_regular_file_fails_at_startup(tmp_path, capsys):
    (tmp_path / "tb").write_text("")
    err = _error(pretrain.main, TINY + ["--train-iters", "2", "--save", str(tmp_path / "ckpt"),
                                        "--tensorboard-dir", str(tmp_path / "tb")], capsys)
    assert err.startswith(f"error: --tensorboard-dir {tmp_path / 'tb'}: exists and is not a directory")
    assert not (tmp_path / "ckpt").exists()  # the check creates nothing


def test_save_that_does_not_exist_yet_is_created_by_the_run(tmp_path, capsys):
    assert pretrain.main(TINY + ["--train-iters", "2", "--save", str(tmp_path / "a" / "b" / "ckpt")]) == 0
    assert (tmp_path / "a" / "b" / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    assert not [n for n in os.listdir(tmp_path / "a" / "b") if n.startswith(".megatron_ds-write-probe")]


# --- --load without a checkpoint ----------------------------------------------------------------


def test_load_without_a_checkpoint_is_an_error_unless_it_is_save(tmp_path, capsys):
    missing = tmp_path / "nope"
    err = _error(pretrain.main, TINY + ["--train-iters", "2", "--load", str(missing), "--save",
                                        str(tmp_path / "ckpt")], capsys)
    assert err.startswith(f"error: --load {missing}: no such directory; pass a directory written by --save")
    (tmp_path / "empty").mkdir()
    err = _error(pretrain.main, TINY + ["--train-iters", "2", "--load", str(tmp_path / "empty")], capsys)
    assert f"--load {tmp_path / 'empty'}: no checkpoint there" in err
    assert not (tmp_path / "ckpt").exists()
    # --load == --save: the first start of a resumable job trains from scratch, the second resumes.
    same = str(tmp_path / "job")
    assert pretrain.main(TINY + ["--train-iters", "1", "--load", same, "--save", same]) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert pretrain.main(TINY + ["--train-iters", "2", "--load", same, "--save", same + "/"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (tmp_path / "job" / "latest").read_text().strip() == "iter_0000002"


# --- B6: a checkpoint of another tokenizer ---------------------------------------------------------


def test_tokenizer_mismatch_is_an_error_unless_overridden(tmp_path, capsys):
    tok_a = _tokenizer(tmp_path / "a.json", ["hello", "world"])
    tok_b = _tokenizer(tmp_path / "b.json", ["other", "words"])
    ckpt = str(tmp_path / "ckpt")
    assert pretrain.main(TINY + ["--train-iters", "1", "--tokenizer-model", tok_a, "--save", ckpt]) == 0
    capsys.readouterr()
    before = _tree(ckpt)
    resume = TINY + ["--train-iters", "2", "--tokenizer-model", tok_b, "--load", ckpt, "--save", ckpt]
    err = _error(pretrain.main, resume, capsys)
    assert err.startswith(f"error: --tokenizer-model {tok_b} (sha256 ")
    assert f"is not the tokenizer --load {ckpt} was trained with ({tok_a}, sha256 " in err
    assert err.endswith("pass that tokenizer, or --override-tokenizer-check to go on with this one")
    assert _tree(ckpt) == before  # nothing trained, nothing saved
    # The same tokenizer resumes; the override goes on with the other one and says so.
    assert pretrain.main(resume + ["--override-tokenizer-check"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "(--override-tokenizer-check)" in out and "resumed from" in out
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000002"


def test_sft_and_dpo_from_a_model_of_another_tokenizer_are_errors(tmp_path, capsys, monkeypatch):
    tok_a = _tokenizer(tmp_path / "a.json", ["hello", "world"])
    tok_b = _tokenizer(tmp_path / "b.json", ["other", "words"])
    base = str(tmp_path / "base")
    assert pretrain.main(TINY + ["--train-iters", "1", "--tokenizer-model", tok_a, "--save", base]) == 0
    capsys.readouterr()
    # SFT's own data checks come first: let them pass, the --load check is what is tested.
    monkeypatch.setattr(sft, "check_inputs", lambda cfg: None)
    err = _error(sft.main, TINY + ["--train-iters", "1", "--tokenizer-model", tok_b, "--load", base], capsys)
    assert f"is not the tokenizer --load {base} was trained with" in err and "--override-tokenizer-check" in err
    # DPO's reference model: --dpo-ref-load is checked the same way.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    err = _error(dpo.main, TINY + ["--train-iters", "1", "--tokenizer-model", tok_b, "--dpo-data", str(pairs),
                                   "--dpo-ref-load", base, "--load", str(tmp_path / "dpo"), "--save",
                                   str(tmp_path / "dpo")], capsys)
    assert f"is not the tokenizer --dpo-ref-load {base} was trained with" in err
    assert not (tmp_path / "dpo").exists()

"""Hugging Face round trip: our export loads in transformers with our logits; a HF Llama with GQA
imported at TP2 x PP2 gives, in our model, transformers' logits.

Tolerance 1e-5 of the logits' scale, as in tests/model/test_hf_parity.py: the same fp32 ops on
the same weights, differing only in summation order (fused GEMMs, TP all-reduce).
"""

import json
import os

import torch
import torch.distributed as dist

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors
from megatron_ds.checkpoint.save import save_checkpoint
from megatron_ds.parallel.topology import ParallelState
from tests.checkpoint.helpers import config, hf_weights, model_with_weights, new_model
from tests.model.hf_reference import hf_model, hf_reference, max_rel_err
from tests.multiproc import run_world
from tools.checkpoint.convert_hf import main as convert_main

TOL = 1e-5  # of the logits' max magnitude; see the module docstring


def _ids():
    return hf_reference("gqa", 1000)[1]


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    from transformers import LlamaForCausalLM

    # Our weights, moved away from HF's by a step of "training", saved and exported.
    model = model_with_weights(ParallelState(), hf_weights())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).view_as(p))
    save_checkpoint(str(tmp_path / "ckpt"), 3, model_sharded_tensors(model), config=config())
    out = str(tmp_path / "hf")
    # A 64 KB limit splits the tiny model into several files: the index is exercised.
    assert convert_main(["export", "--load", str(tmp_path / "ckpt"), "--save", out,
                         "--max-shard-size-mb", "0.0625"]) == 0
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=_ids()).logits
        ours = model(input_ids=_ids())[..., :config().vocab_size]
    assert max_rel_err(ours, ref) < TOL


def _tokenizer(path):
    """A word-level tokenizer.json with BOS, EOS and PAD special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "<pad>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(path)
    return path


def _export_with_tokenizer(tmp_path):
    tok = _tokenizer(str(tmp_path / "tokenizer.json"))
    model = model_with_weights(ParallelState(), hf_weights())
    save_checkpoint(str(tmp_path / "ckpt"), 1, model_sharded_tensors(model), config=config(),
                    tokenizer={"path": tok, "sha256_16": "x"})
    assert convert_main(["export", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0
    return tok, str(tmp_path / "hf")


def test_export_copies_the_recorded_tokenizer_and_its_ids(tmp_path):
    tok, out = _export_with_tokenizer(tmp_path)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["num_key_value_heads"]) == (0, 1, 5, 2)
    with open(os.path.join(out, "tokenizer.json")) as f, open(tok) as g:
        assert f.read() == g.read()
    assert sorted(n for n in os.listdir(out) if not n.startswith("model")) == [
        "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 5}


def test_exported_tokenizer_loads_in_autotokenizer_with_our_ids_and_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    from megatron_ds.data.tokenizer import build_tokenizer

    tok, out = _export_with_tokenizer(tmp_path)
    ours, hf = build_tokenizer(tok), AutoTokenizer.from_pretrained(out)
    text = "hello world hello </s> world"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text) == [3, 4, 3, 1, 4]
    assert hf(text)["input_ids"] == ours.encode(text)  # tokenizer.json has no post-processor: nothing added
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos, ours.eod, ours.pad) == (0, 1, 5)
    assert hf.model_max_length == config().max_position_embeddings
    assert hf.decode([3, 4, 1]) == ours.decode([3, 4, 1])


def test_exported_generation_config_stops_generate_at_eos(tmp_path):
    from transformers import LlamaForCausalLM

    _, out = _export_with_tokenizer(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (1, 5)
    ids = torch.tensor([[0, 3, 4]])
    with torch.no_grad():  # EOS made the only likely next token (logit |h|^2, all others 0): one step, then stop
        h = hf.model(input_ids=ids).last_hidden_state[0, -1]
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[1] = h
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert seq.tolist() == [[0, 3, 4, 1]]


def _import_rank(root, ids):
    """TP2 ranks, each holding both pipeline stages (layers 0 and 1) chained by hand."""
    tp_group = dist.group.WORLD
    reader = CheckpointReader(root)
    first = new_model(tp_group=tp_group, post_process=False, layer_range=range(0, 1))
    last = new_model(tp_group=tp_group, pre_process=False, layer_range=range(1, 2))
    load_model(first, reader)
    load_model(last, reader)
    with torch.no_grad():
        logits = last(hidden_states=first(input_ids=ids)).contiguous()  # [b, s, V_padded/2]
    shards = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(shards, logits, group=tp_group)
    return torch.cat(shards, dim=-1)[..., :config().vocab_size]


def test_hf_gqa_model_imported_at_tp2_pp2_gives_transformers_logits(tmp_path):
    hf = hf_model("gqa", 1000)  # 4 query heads over 2 KV heads, random norm weights too
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf.save_pretrained(hf_dir, max_shard_size="100KB")
    assert convert_main(["import", "--hf", hf_dir, "--save", out, "--target-tp", "2", "--target-pp", "2"]) == 0
    ckpt = CheckpointReader(out)
    assert ckpt.meta["layout"] == dict(tp=2, pp=2, dp=1)
    assert sorted(f for f in ckpt.meta["files"] if f.endswith(".safetensors")) == \
        [f"rank_{r:05d}.safetensors" for r in range(4)]
    ref = hf_reference("gqa", 1000)[3]
    for logits in run_world(2, _import_rank, root=out, ids=_ids()):
        assert max_rel_err(logits, ref) < TOL


def test_import_then_export_gives_back_the_hf_weights(tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf_model("gqa", 1000).save_pretrained(hf_dir)
    assert convert_main(["import", "--hf", hf_dir, "--save", str(tmp_path / "ckpt"), "--target-tp", "2"]) == 0
    assert convert_main(["export", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "back")]) == 0
    from safetensors.torch import load_file

    with open(os.path.join(str(tmp_path / "back"), "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    back = {}
    for fname in files:
        back.update(load_file(os.path.join(str(tmp_path / "back"), fname)))
    original = hf_weights()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_import_of_a_directory_without_config_is_a_one_line_error(tmp_path, capsys):
    assert convert_main(["import", "--hf", str(tmp_path), "--save", str(tmp_path / "out")]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def _error(argv, capsys):
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def test_export_into_an_existing_model_is_refused_and_force_replaces_it_without_stale_shards(tmp_path, capsys):
    model = model_with_weights(ParallelState(), hf_weights())
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    save_checkpoint(ckpt, 3, model_sharded_tensors(model), config=config())
    assert convert_main(["export", "--load", ckpt, "--save", out, "--max-shard-size-mb", "0.0625"]) == 0
    (tmp_path / "hf" / "README.md").write_text("notes")
    first = _files(out)
    shards = [n for n in first if n.startswith("model-")]
    assert len(shards) > 2
    # A second export: refused, and nothing in the directory changes.
    err = _error(["export", "--load", ckpt, "--save", out], capsys)
    assert err == (f"error: --save {out} already holds a Hugging Face model (config.json, {shards[0]}, {shards[1]} "
                   f"and {len(first) - 4} more); write to a new directory, or pass --force to replace it")
    assert _files(out) == first
    # --force: one shard now; the old ones are gone, the README stays, nothing temporary is left.
    assert convert_main(["export", "--load", ckpt, "--save", out, "--force"]) == 0
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model-00001-of-00001.safetensors",
                                       "model.safetensors.index.json"]
    from safetensors.torch import load_file

    assert load_file(os.path.join(out, "model-00001-of-00001.safetensors")).keys() == hf_weights().keys()


def test_import_into_a_checkpoint_dir_is_refused_unless_forced(tmp_path, capsys):
    hf_dir, run = str(tmp_path / "hf"), str(tmp_path / "run")
    hf_model("gqa", 1000).save_pretrained(hf_dir)
    save_checkpoint(run, 7, model_sharded_tensors(new_model()), config=config())
    capsys.readouterr()  # transformers' progress bars
    err = _error(["import", "--hf", hf_dir, "--save", run], capsys)
    assert err.startswith(f"error: --save {run} already holds a checkpoint ('latest' names iter_0000007); write to "
                          "a new directory, or pass --force")
    assert sorted(os.listdir(run)) == ["iter_0000007", "latest"]
    assert convert_main(["import", "--hf", hf_dir, "--save", run, "--force"]) == 0
    assert "still names iter_0000007, newer than iter_0000000" in capsys.readouterr().out
    assert CheckpointReader(run).iteration == 7 and CheckpointReader(os.path.join(run, "iter_0000000")).iteration == 0


def test_convert_to_an_unwritable_save_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for cmd in (["export", "--load", str(tmp_path)], ["import", "--hf", str(tmp_path)]):
        err = _error(cmd + ["--save", str(tmp_path / "file")], capsys)
        assert err == (f"error: --save {tmp_path / 'file'}: exists and is not a directory; "
                       "pass a directory (new or existing)")
    assert (tmp_path / "file").read_text() == "x"


def test_import_to_a_layout_the_trainer_refuses_is_one_line_naming_the_tools_flag(tmp_path, capsys):
    """--target-tp 3 (4 heads) and --target-pp 8 (2 layers): the trainer's rules in the tool's flags, exit 2,
    nothing written."""
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf_model("gqa", 1000).save_pretrained(hf_dir)
    capsys.readouterr()
    assert _error(["import", "--hf", hf_dir, "--save", out, "--target-tp", "3"], capsys) == (
        "error: --target-tp 3 does not divide 4 attention heads (the model's num_attention_heads)")
    assert _error(["import", "--hf", hf_dir, "--save", out, "--target-pp", "8"], capsys) == (
        "error: --target-pp 8: every pipeline stage needs at least one layer, the split is "
        "[1, 1, 0, 0, 0, 0, 0, 0] for the model's num_layers 2")
    assert not os.path.exists(out)

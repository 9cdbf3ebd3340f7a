"""Greedy generation at TP2 x PP2 from our checkpoint picks exactly the tokens that transformers'
LlamaForCausalLM.generate(do_sample=False) picks on the same weights, read from our HF export.

Exact token equality is meaningful only where no step is a near-tie: fp32 logits of the two
implementations differ by at most 6e-7 absolute here (measured; summation order), so the test first
checks that every step's top-1 logit beats the runner-up by far more than that (> 1e-4, measured
smallest 1.3e-4), and that the continuation is not one token repeated.
"""

import torch

from megatron_ds.checkpoint.hf import export_hf
from megatron_ds.inference import generate
from megatron_ds.inference.loading import load_inference_model
from megatron_ds.parallel.topology import build_parallel_state
from tests.inference.helpers import PROMPT, save_tiny_checkpoint, tiny_config
from tests.multiproc import run_world

NEW = 16
MIN_MARGIN = 1e-4  # top-1 minus top-2 logit at every HF step; see the module docstring


def _generate_tp2_pp2(root, prompt, n):
    state = build_parallel_state(2, 2)
    model, _ = load_inference_model(root, state)
    return generate(model, state, prompt, n).tokens


def test_greedy_at_tp2_pp2_equals_transformers_generate_on_the_hf_export(tmp_path):
    from transformers import LlamaForCausalLM

    ckpt, hf_dir = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    save_tiny_checkpoint(ckpt, tiny_config())
    export_hf(ckpt, hf_dir)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        # An explicit mask: HF would otherwise mask every prompt token equal to pad_token_id.
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    expected = out.sequences[:, len(PROMPT):]
    assert expected.shape == (1, NEW)
    margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    assert min(margins) > MIN_MARGIN, margins
    assert len(set(expected[0].tolist())) > 3, expected

    for rank, tokens in enumerate(run_world(4, _generate_tp2_pp2, root=ckpt, prompt=PROMPT, n=NEW)):
        assert torch.equal(tokens, expected), (rank, tokens, expected)

"""Generation tokens/s on CPU with and without the KV cache, one process, greedy.

    python benchmarks/bench_generate.py [--model tiny] [--prompt-len 128] [--new-tokens 128] [--repeats 3]

Both runs generate the same tokens from the same randomly initialized model (the script checks):
with the cache the prompt is run once and each step feeds one token; without it every step re-runs
the whole sequence, so its cost per token grows with the length. tokens/s = new tokens / wall time
of the whole ``generate`` call (prefill included), best of ``--repeats`` (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> None:
    import torch

    from megatron_ds.config import model_preset
    from megatron_ds.inference import generate
    from megatron_ds.model.deepseek import DeepSeekModel
    from megatron_ds.parallel.topology import ParallelState

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="architecture preset (random weights)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = model_preset(args.model)
    model = DeepSeekModel(config, seed=1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    state = ParallelState()

    def timed(use_cache: bool):
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = generate(model, state, prompt, args.new_tokens, use_kv_cache=use_cache).tokens
            best = min(best, time.perf_counter() - t0)
        return tokens, best

    generate(model, state, prompt, 4)  # warm-up (kernel loading, allocator)
    cached_tokens, t_cached = timed(True)
    plain_tokens, t_plain = timed(False)
    if not torch.equal(cached_tokens, plain_tokens):
        raise SystemExit("cached and uncached generation disagree; the benchmark is void")
    n = cached_tokens.shape[1]
    print(f"model {args.model} ({config.num_layers} layers, hidden {config.hidden_size}), prompt {args.prompt_len} "
          f"tokens, {n} new tokens, {torch.get_num_threads()} thread(s), kernels {model.kernels.name}")
    print(f"with KV cache:    {n / t_cached:8.1f} tokens/s  ({t_cached:.3f} s)")
    print(f"without KV cache: {n / t_plain:8.1f} tokens/s  ({t_plain:.3f} s)")
    print(f"speedup:          {t_plain / t_cached:8.2f}x")


if __name__ == "__main__":
    main()

"""How the L layers are cut into pipeline stages and virtual stages: arithmetic only.

The split is even by default; uneven splits come from ``--decoder-first-pipeline-num-layers`` /
``--decoder-last-pipeline-num-layers`` (those stages get the given count, the others share the rest
evenly) or from ``--pipeline-layer-split`` (every stage's count). Interleaving
(``--num-layers-per-virtual-pipeline-stage k``) cuts the layers into V * P virtual stages of k
layers each; rank r holds chunks c * P + r. ``model/partition.py`` builds the chunks from this.

It sits below config.py (whose ``validate`` calls ``check_pipeline_config``) and imports nothing of
the package but the error type, so the configuration never depends on the model.
"""

from __future__ import annotations

from megatron_ds.errors import ConfigError

# ``parallel`` below is a config.ParallelConfig; it is not imported (config.py imports this module).


def parse_layer_split(text: str) -> list[int]:
    """'11,12,12' -> [11, 12, 12]; a malformed list is a ConfigError naming the flag."""
    try:
        counts = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--pipeline-layer-split {text!r}: give integers separated by commas, e.g. 11,12,12") from None
    return counts


def stage_layer_counts(num_layers: int, parallel) -> list[int]:
    """Layers of each of the P (physical) stages, first stage first; raises ConfigError if the split does not add up."""
    pp = parallel.pipeline_model_parallel_size
    first, last = parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    if parallel.pipeline_layer_split is not None:
        if first is not None or last is not None:
            raise ConfigError("--pipeline-layer-split excludes --decoder-first-pipeline-num-layers and "
                              "--decoder-last-pipeline-num-layers; give one or the other")
        counts = parse_layer_split(parallel.pipeline_layer_split)
        if len(counts) != pp:
            raise ConfigError(f"--pipeline-layer-split {parallel.pipeline_layer_split} has {len(counts)} stages, "
                              f"--pipeline-model-parallel-size is {pp}; give one count per stage")
        if sum(counts) != num_layers:
            raise ConfigError(f"--pipeline-layer-split {parallel.pipeline_layer_split} adds up to {sum(counts)} layers, "
                              f"not --num-layers {num_layers}")
    else:
        fixed = {}
        if first is not None:
            fixed[0] = first
        if last is not None:
            if pp == 1 and first is not None:
                raise ConfigError("--decoder-first-pipeline-num-layers and --decoder-last-pipeline-num-layers "
                                  "name the same stage at --pipeline-model-parallel-size 1; give one")
            fixed[pp - 1] = last
        flags = " + ".join(f"--decoder-{'first' if i == 0 else 'last'}-pipeline-num-layers {n}"
                           for i, n in sorted(fixed.items()))
        rest, others = num_layers - sum(fixed.values()), pp - len(fixed)
        if not fixed and pp > num_layers:
            raise ConfigError(f"--pipeline-model-parallel-size {pp} exceeds --num-layers {num_layers}: every pipeline "
                              f"stage needs at least one layer")
        if not fixed and rest % pp != 0:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide --num-layers {num_layers} into equal stages; "
                f"set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers, or every stage's "
                f"count with --pipeline-layer-split (e.g. {','.join(map(str, _near_even(num_layers, pp)))})")
        if rest < 0:
            raise ConfigError(f"{flags}: more layers than --num-layers {num_layers}; lower them")
        if others == 0 and rest != 0:
            raise ConfigError(f"{flags}: {num_layers - rest} layers on {pp} stage(s), not --num-layers {num_layers}; "
                              f"make them add up")
        if others > 0 and rest % others != 0:
            raise ConfigError(f"with {flags}, the other {others} stage(s) get {rest} of --num-layers {num_layers}, which "
                              f"does not split evenly; pick counts that leave a multiple of {others}, or "
                              f"--pipeline-layer-split")
        counts = [fixed.get(i, rest // others if others else 0) for i in range(pp)]
    if any(n < 1 for n in counts):
        flag = ("--pipeline-layer-split" if parallel.pipeline_layer_split is not None else
                "--decoder-first-pipeline-num-layers" if first is not None and first < 1 else
                "--decoder-last-pipeline-num-layers" if last is not None and last < 1 else
                "--pipeline-model-parallel-size")
        raise ConfigError(f"{flag}: every pipeline stage needs at least one layer, the split is {counts} "
                          f"for --num-layers {num_layers}")
    return counts


def _near_even(num_layers: int, pp: int) -> list[int]:
    """A split of ``num_layers`` into ``pp`` counts that differ by at most one, the larger ones last."""
    base, extra = divmod(num_layers, pp)
    return [base + (i >= pp - extra) for i in range(pp)]


def num_virtual_chunks(num_layers: int, parallel) -> int:
    """V, the model chunks per rank (1 without interleaving)."""
    k = parallel.num_layers_per_virtual_pipeline_stage
    if k is None:
        return 1
    return num_layers // (parallel.pipeline_model_parallel_size * k)


def virtual_stage_ranges(num_layers: int, parallel) -> list[range]:
    """Layer range of each of the V * P virtual stages in pipeline order (= the P stages when V = 1)."""
    k = parallel.num_layers_per_virtual_pipeline_stage
    if k is not None:
        return [range(v * k, (v + 1) * k) for v in range(num_layers // k)]
    bounds = [0]
    for n in stage_layer_counts(num_layers, parallel):
        bounds.append(bounds[-1] + n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def rank_chunk_ranges(num_layers: int, parallel, pp_rank: int) -> list[range]:
    """Layer ranges of pipeline rank ``pp_rank``'s model chunks: chunk c is virtual stage c * P + pp_rank."""
    pp = parallel.pipeline_model_parallel_size
    stages = virtual_stage_ranges(num_layers, parallel)
    return [stages[c * pp + pp_rank] for c in range(len(stages) // pp)]


def check_pipeline_config(num_layers: int, parallel, num_microbatches: int) -> None:
    """Every pipeline rule that needs no process group: the split adds up, interleaving fits."""
    pp = parallel.pipeline_model_parallel_size
    stage_layer_counts(num_layers, parallel)
    k = parallel.num_layers_per_virtual_pipeline_stage
    if k is None:
        return
    flag = f"--num-layers-per-virtual-pipeline-stage {k}"
    if pp == 1:
        raise ConfigError(f"{flag} needs --pipeline-model-parallel-size > 1 (interleaving splits pipeline stages)")
    if (parallel.pipeline_layer_split is not None or parallel.decoder_first_pipeline_num_layers is not None
            or parallel.decoder_last_pipeline_num_layers is not None):
        raise ConfigError(f"{flag} needs the even split; drop --pipeline-layer-split and "
                          f"--decoder-first/last-pipeline-num-layers")
    if k < 1 or num_layers % (pp * k) != 0:
        raise ConfigError(f"{flag} x --pipeline-model-parallel-size {pp} does not divide --num-layers {num_layers}")
    if num_layers // (pp * k) < 2:
        raise ConfigError(f"{flag} gives one chunk per rank at --pipeline-model-parallel-size {pp} and "
                          f"--num-layers {num_layers}; use fewer layers per virtual stage, or drop the flag for 1F1B")
    if num_microbatches % pp != 0:
        raise ConfigError(
            f"--global-batch-size gives {num_microbatches} micro-batches per data-parallel rank; the interleaved "
            f"schedule ({flag}) needs a multiple of --pipeline-model-parallel-size {pp}")

"""Checkpoints described by global shapes, so any layout reads any other (docs/checkpoint_format.md).

    checkpointing.py   save(...) / load(...): what the trainer calls
    save.py            save_checkpoint: atomic, per-rank files; AsyncCheckpointWriter
    load.py            CheckpointReader: reads exactly the slices a rank needs, checks files
    sharded_tensor.py  ShardedTensor: a block (or flat range of a block) of a global tensor
    model_state.py     a DeepSeekModel shard <-> pieces; load_model
    preemption.py      SIGTERM/SIGINT -> a flag the loop checks at step boundaries
    offline.py         writing a checkpoint for a target layout, streaming (reshard)
    hf.py              Hugging Face Llama export / import
    format.py          paths, metadata, `latest`, pruning, CheckpointError
    optimizer_state.py MegatronOptimizer (ZeRO-1 or not) / torch AdamW state <-> pieces; its load
    run_checkpoints.py what pretrain.run uses: --load, periodic / final / preemption saves
"""

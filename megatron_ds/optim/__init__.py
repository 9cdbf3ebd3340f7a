"""Optimizer, gradient clipping and learning-rate schedules.

    distributed_optimizer.py  MegatronOptimizer: fp32 master weights, fused AdamW, global-norm
                              clipping, plain DP or ZeRO-1, fp32 or bf16 params (the trainer's path)
    fused_adamw.py            the fused AdamW kernel (csrc/) with its PyTorch reference
    lr_schedule.py            warmup + constant / cosine / WSD / DeepSeek multi-step, steps or tokens
    optimizer.py              a stock torch.optim.AdamW with the recipe's weight-decay groups
                              (checkpoints load into it too)
"""

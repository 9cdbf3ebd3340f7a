#!/usr/bin/env bash
# DeepSeek LLM 7B pre-training with the paper's recipe on a multi-node GPU cluster.
#
#   mkdir -p logs && sbatch examples/pretrain_deepseek_7b.sh      # SLURM, from the repo root
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=node0 MASTER_PORT=29500 \
#       bash examples/pretrain_deepseek_7b.sh                       # plain torchrun, once per node
#   DRY_RUN=1 NNODES=8 bash examples/pretrain_deepseek_7b.sh       # print the plan and exit
#   bash examples/pretrain_deepseek_7b.sh --dry-run --log-interval 1  # extra args go to megatron_ds.pretrain
#
# Environment: DATA_PATH (a .bin/.idx prefix, or "w1 p1 w2 p2" to blend), TOKENIZER (tokenizer.json),
# CKPT_DIR (saved to and resumed from), TB_DIR (TensorBoard); GPUS_PER_NODE (8); TP, PP, MICRO_BATCH,
# LAYER_SPLIT, TRAIN_TOKENS (2e12) or TRAIN_ITERS to override; LAUNCHER=slurm|torchrun (default: slurm
# inside an allocation); the NCCL variables in examples/common_cluster_env.sh.
#
# Layout: TP 1 x PP 1 (DP 64 on 64 GPUs), micro-batch 1, no recomputation: the fastest layout
# `python tools/plan_layout.py --model deepseek-7b --gpus 64 --gpu h100` finds that fits in 80 GB
# (est. 12.8 s/step, 58.8 GiB: 40 GiB of bf16 params, fp32 grads and the 1/64 ZeRO-1 shard + 18 GiB of
# activations). 7B fits a whole GPU, so any TP only adds exposed NVLink time (TP 2 is ~4% slower at
# mb 4) and any PP a bubble; --sequence-parallel is dropped at TP 1 (nothing to split) and returns with
# TP=2. On 40 GB A100s (--gpu a100 --memory-gib 40) the planner moves to PP=4 (split 8,8,8,6: the last
# stage is lighter because it runs the LM head, ~1.8 layers of work at this width) or TP=2 at 0.6% more.
#SBATCH --job-name=deepseek-7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: find the repo from where it was submitted.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO_DIR" || exit 2
[[ -f examples/common_cluster_env.sh ]] || { echo "error: $REPO_DIR is not the megatron-ds repo; set REPO_DIR" >&2; exit 2; }
# shellcheck source=examples/common_cluster_env.sh
source examples/common_cluster_env.sh
parse_script_args "$@"   # DRY_RUN, and ARGS: the extra trainer flags

MODEL=deepseek-7b
NUM_LAYERS=30
SEQ_LENGTH=4096
GLOBAL_BATCH=2304       # sequences: 9.44M tokens per step (the paper's 7B batch)
LR=4.2e-4               # the paper's 7B peak
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}

pretrain_with_paper_recipe

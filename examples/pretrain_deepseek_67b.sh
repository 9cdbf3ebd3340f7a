#!/usr/bin/env bash
# DeepSeek LLM 67B pre-training with the paper's recipe on a multi-node GPU cluster.
#
#   mkdir -p logs && sbatch examples/pretrain_deepseek_67b.sh     # SLURM, from the repo root
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=node0 MASTER_PORT=29500 \
#       bash examples/pretrain_deepseek_67b.sh                       # plain torchrun, once per node
#   DRY_RUN=1 NNODES=32 bash examples/pretrain_deepseek_67b.sh       # print the plan and exit
#   bash examples/pretrain_deepseek_67b.sh --dry-run --log-interval 1  # extra args go to megatron_ds.pretrain
#
# Environment: DATA_PATH (a .bin/.idx prefix, or "w1 p1 w2 p2" to blend), TOKENIZER (tokenizer.json),
# CKPT_DIR (saved to and resumed from), TB_DIR (TensorBoard); GPUS_PER_NODE (8); TP, PP, MICRO_BATCH,
# LAYER_SPLIT, TRAIN_TOKENS (2e12) or TRAIN_ITERS to override; LAUNCHER=slurm|torchrun (default: slurm
# inside an allocation); the NCCL variables in examples/common_cluster_env.sh.
#
# Layout: TP 2 x PP 16 (DP 8 on 256 GPUs), micro-batch 1, no recomputation. That is the fastest layout
# `python tools/plan_layout.py --model deepseek-67b --gpus 256 --gpu h100` finds that fits in 80 GB:
# est. 64.9 s/step, 65.4 GiB on the fullest GPU (stage 0: 16 micro-batches in flight of 6 layers each).
# TP stays at 2 because only the column-parallel backward's collectives overlap GEMMs; the forward's and
# the row-parallel backward's are exposed, so every TP doubling adds NVLink time (TP 8 x PP 8: est.
# 75.6 s/step, 20% of it TP traffic); the depth goes to the pipeline instead, whose bubble (P-1)/(M+P-1)
# is small at M = 576 micro-batches (PP 32 halves the activations but doubles the p2p: est. 66.3 s/step).
# 95 layers do not divide by 16: the stages take 6 layers each and the last takes 5
# (--decoder-last-pipeline-num-layers 5), as it also runs the LM head and the loss (about one layer of
# work). On 1024 GPUs the planner prefers TP 4 x PP 8 (DP 32): NNODES=128 TP=4 PP=8 (split 12 x 7 + 11).
#SBATCH --job-name=deepseek-67b
#SBATCH --nodes=32
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

MODEL=deepseek-67b
NUM_LAYERS=95
SEQ_LENGTH=4096
GLOBAL_BATCH=4608       # sequences: 18.87M tokens per step (the paper's 67B batch)
LR=3.2e-4               # the paper's 67B peak
TP=${TP:-2}
PP=${PP:-16}
MICRO_BATCH=${MICRO_BATCH:-1}

pretrain_with_paper_recipe

#!/usr/bin/env bash
# DPO of the DeepSeek LLM 67B SFT model with the paper's recipe on a multi-node GPU cluster: 1 epoch over the
# preference pairs, LR 5e-6, batch 512 pairs, warmup then cosine.
#
#   mkdir -p logs && sbatch examples/dpo_deepseek_67b.sh          # SLURM, from the repo root
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=node0 MASTER_PORT=29500 \
#       bash examples/dpo_deepseek_67b.sh                           # plain torchrun, once per node
#   DRY_RUN=1 NNODES=32 bash examples/dpo_deepseek_67b.sh           # print the plan and exit
#   bash examples/dpo_deepseek_67b.sh --dry-run --dpo-beta 0.05      # extra args go to megatron_ds.dpo
#
# Environment: DPO_DATA (jsonl of {"prompt", "chosen", "rejected"}), TOKENIZER (tokenizer.json), SFT_CKPT (the SFT
# model: policy start and frozen reference), CKPT_DIR (this run's checkpoints, saved to and resumed from), TB_DIR
# (TensorBoard); GPUS_PER_NODE (8); TP, PP, MICRO_BATCH (pairs), LAYER_SPLIT, SEQ_LENGTH (4096), WARMUP_ITERS (30),
# BETA (0.1), PRECOMPUTE (1); LAUNCHER=slurm|torchrun; the NCCL variables in examples/common_cluster_env.sh.
#
# The paper gives the epoch, LR, batch and schedule shape, not beta, the warmup length or the weight decay: beta 0.1
# (the DPO paper's and TRL's default), 30 warmup steps (about a tenth of an epoch of ~150k pairs), cosine to 0
# (Hugging Face's cosine-with-warmup, what TRL runs), weight decay 0 and AdamW 0.9/0.95 (pre-training's betas).
#
# Layout: TP 4 x PP 8 (DP 8 on 256 GPUs), one pair (two 4096-token rows) per micro-batch, no recomputation.
# That is the fastest layout `python tools/plan_layout.py --model deepseek-67b --gpus 256 --gpu h100
# --global-batch-size 1024 --micro-batch-sizes 2` finds for 512 pairs = 1024 rows: est. 16.4 s/step, 63.8 GiB of
# the 68 GiB budget on stage 0. It has no room for a second, frozen copy of the weights during training (+4.3 GiB
# of bf16 weights per GPU), so the reference log-probs are precomputed in one forward-only pass before the first
# step and the reference model is freed (PRECOMPUTE=1; for one epoch this costs the same reference forwards as
# computing them every step). With PRECOMPUTE=0 the reference stays resident: use a layout with room, e.g.
# TP=8 PP=8 (est. 36.2 GiB with the reference's 2.1 GiB). The pipeline's 95 layers: 12 per stage, the last stage
# 11 (it also runs the LM head and the loss).
#SBATCH --job-name=deepseek-67b-dpo
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
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
SEQ_LENGTH=${SEQ_LENGTH:-4096}
GLOBAL_BATCH=512        # preference pairs per step (the paper's DPO batch)
LR=5e-6                 # the paper's DPO learning rate
TP=${TP:-4}
PP=${PP:-8}
MICRO_BATCH=${MICRO_BATCH:-1}   # pairs: 2 rows of SEQ_LENGTH tokens each
WARMUP_ITERS=${WARMUP_ITERS:-30}
BETA=${BETA:-0.1}
PRECOMPUTE=${PRECOMPUTE:-1}

require_env DPO_DATA "jsonl of {\"prompt\", \"chosen\", \"rejected\"} records"
require_env TOKENIZER "tokenizer.json"
require_env SFT_CKPT "checkpoint directory of the SFT model"
require_env CKPT_DIR "checkpoint directory of this DPO run"
require_env TB_DIR "TensorBoard directory"
resolve_cluster
resolve_layout

PRECOMPUTE_ARGS=()
if [[ "$PRECOMPUTE" == 1 ]]; then PRECOMPUTE_ARGS=(--dpo-precompute-ref); fi
# The policy resumes CKPT_DIR when it holds a checkpoint (a requeued job), else starts from SFT_CKPT's weights;
# the reference is always SFT_CKPT. --dpo-epochs 1 sets the number of steps from the number of pairs.
TRAIN_ARGS=(
    --model "$MODEL"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${SPLIT_ARGS[@]}"
    "${SP_ARGS[@]}" --use-distributed-optimizer --overlap-param-gather --bf16
    --seq-length "$SEQ_LENGTH" --max-position-embeddings 4096
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --dpo-epochs 1
    --lr "$LR" --min-lr 0 --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-style cosine
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.0 --clip-grad 1.0
    --dpo-data "$DPO_DATA" --dpo-beta "$BETA" --dpo-loss-type sigmoid "${PRECOMPUTE_ARGS[@]}"
    --tokenizer-model "$TOKENIZER" --dpo-ref-load "$SFT_CKPT"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval-minutes 5 --keep-last-n 3
    --tensorboard-dir "$TB_DIR" --log-interval 1
    "${ARGS[@]}"
)
ENTRY_MODULE=megatron_ds.dpo
BATCH_DESC="$GLOBAL_BATCH pairs = $((2 * GLOBAL_BATCH)) sequences x $SEQ_LENGTH = $((2 * TOKENS_PER_STEP)) tokens/step"
SCHEDULE_DESC="1 epoch of the pairs (--dpo-epochs 1: steps = ceil(pairs / $GLOBAL_BATCH)); lr $LR, $WARMUP_ITERS warmup, cosine to 0; beta $BETA; reference log-probs $(if [[ "$PRECOMPUTE" == 1 ]]; then echo "precomputed, reference freed"; else echo "every step"; fi)"
# The planner counts rows: a pair is two.
DPO_ESTIMATE=${ESTIMATE:-1}
ESTIMATE=0
cluster_launch
if [[ "$DRY_RUN" == 1 && "$DPO_ESTIMATE" == 1 ]]; then
    split=()
    if [[ -n "$STAGE_SPLIT" ]]; then split=(--split "$STAGE_SPLIT"); fi
    echo "estimate (policy, $((2 * GLOBAL_BATCH)) rows): $(python tools/plan_layout.py --model "$MODEL" --gpus "$WORLD_SIZE" \
        --gpus-per-node "$GPUS_PER_NODE" --gpu "${GPU_TYPE:-h100}" --global-batch-size $((2 * GLOBAL_BATCH)) \
        --seq-length "$SEQ_LENGTH" --layout "$TP" "$PP" $((2 * MICRO_BATCH)) "${split[@]}" 2>&1 || true)"
fi

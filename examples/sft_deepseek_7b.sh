#!/usr/bin/env bash
# DeepSeek LLM 7B chat: supervised fine-tuning in two stages on a multi-node GPU cluster.
#
# The paper: 7B fine-tuned for 4 epochs at LR 1e-5 on ~1.5M instruction instances, then a second SFT stage
# on conversational data only (to cut repetition). Everything else below is our choice where the paper is
# silent, and says so.
#
#   mkdir -p logs && STAGE=1 sbatch examples/sft_deepseek_7b.sh     # stage 1: all SFT data, from the base model
#   STAGE=2 sbatch examples/sft_deepseek_7b.sh                       # stage 2: conversations only, from stage 1
#   NNODES=2 NODE_RANK=<0..1> MASTER_ADDR=node0 bash examples/sft_deepseek_7b.sh   # plain torchrun, per node
#   DRY_RUN=1 STAGE=2 bash examples/sft_deepseek_7b.sh              # print the plan and exit
#   bash examples/sft_deepseek_7b.sh --dry-run --log-interval 5      # extra args go to megatron_ds.sft
#
# Environment: SFT_DATA (stage 1) and CONV_DATA (stage 2): prefixes written by tools/preprocess_sft.py (several
# prefixes, space-separated, are trained on together); VALID_DATA (optional, held-out conversations);
# TOKENIZER (tokenizer.json); BASE_CKPT (the pre-trained model: our checkpoint at any layout, or one made by
# `tools/checkpoint/convert_hf.py import --hf deepseek-llm-7b-base/ --save BASE_CKPT`); CKPT_DIR (stage1/ and
# stage2/ are written under it); TB_DIR; EPOCHS, GLOBAL_BATCH, TP, PP, MICRO_BATCH to override; the cluster
# variables (NNODES, GPUS_PER_NODE, LAUNCHER, NCCL_*) of examples/common_cluster_env.sh.
#
# A stage that finds its own checkpoint under CKPT_DIR (an interrupted run) resumes it (--resume-sft:
# iteration, data position, optimizer); otherwise it starts from the weights it is given (iteration 0).
#
# Layout: TP 1 x PP 1 x DP 16 on 2 nodes, micro-batch 1 x 4096 tokens (tools/plan_layout.py: est. 63.6 of 68 GiB
# usable on an 80 GB H100, 3.2 s/step): 7B with ZeRO-1 over 16 ranks is ~45 GiB
# of bf16 params, fp32 grads and the optimizer shard plus ~18 GiB of activations, inside 80 GB; SFT needs far
# fewer steps than pre-training, so 2 nodes finish stage 1 in about a day on ~1.5M conversations.
#SBATCH --job-name=deepseek-7b-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
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
SEQ_LENGTH=4096         # conversations are packed into full 4096-token samples (the model's context)
GLOBAL_BATCH=${GLOBAL_BATCH:-128}  # packed sequences, ~0.5M tokens per step (ours: the paper gives no SFT batch)
LR=1e-5                 # the paper's 7B SFT learning rate
MIN_LR=1e-6             # cosine to 0.1x (ours)
WARMUP=100              # steps of linear warmup (ours)
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-2}}
STAGE=${STAGE:-1}

require_env CKPT_DIR "checkpoint directory (stage1/ and stage2/ go under it)"
require_env TOKENIZER "tokenizer.json"
require_env TB_DIR "TensorBoard directory"
case "$STAGE" in
    1)  require_env SFT_DATA "prefix(es) of all SFT conversations, from tools/preprocess_sft.py"
        require_env BASE_CKPT "pre-trained checkpoint (ours, or tools/checkpoint/convert_hf.py import)"
        DATA=$SFT_DATA
        EPOCHS=${EPOCHS:-4}       # the paper's 7B SFT epochs
        START_FROM=$BASE_CKPT ;;
    2)  require_env CONV_DATA "prefix(es) of the conversational SFT data, from tools/preprocess_sft.py"
        DATA=$CONV_DATA
        EPOCHS=${EPOCHS:-1}       # the paper does not give the second stage's length; one pass (ours)
        START_FROM=$CKPT_DIR/stage1 ;;
    *)  die "STAGE=$STAGE: choose 1 (all SFT data, from BASE_CKPT) or 2 (conversations only, from stage 1)" ;;
esac
SAVE_DIR=$CKPT_DIR/stage$STAGE

resolve_cluster
resolve_layout

if [[ -f "$SAVE_DIR/latest" ]]; then
    LOAD_ARGS=(--load "$SAVE_DIR" --resume-sft)   # this stage was interrupted: continue it
else
    LOAD_ARGS=(--load "$START_FROM")              # weights only, iteration 0
fi
VALID_ARGS=()
if [[ -n "${VALID_DATA:-}" ]]; then
    read -r -a VALID_PREFIXES <<< "$VALID_DATA"
    VALID_ARGS=(--valid-data-path "${VALID_PREFIXES[@]}" --eval-interval 200 --eval-iters 10)
fi
read -r -a DATA_ARGS <<< "$DATA"

ENTRY_MODULE=megatron_ds.sft
SCHEDULE_DESC="SFT stage $STAGE: $EPOCHS epoch(s) (--epochs: iterations from the packed samples / $GLOBAL_BATCH); lr $LR, $WARMUP warmup, cosine to $MIN_LR"
TRAIN_ARGS=(
    --model "$MODEL"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${SPLIT_ARGS[@]}"
    "${SP_ARGS[@]}" --use-distributed-optimizer --overlap-param-gather --bf16
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS"
    # AdamW as in pre-training (0.9/0.95, weight decay 0.1, clip 1.0); the schedule is ours, see above.
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --data-path "${DATA_ARGS[@]}" "${VALID_ARGS[@]}" --tokenizer-model "$TOKENIZER"
    "${LOAD_ARGS[@]}" --save "$SAVE_DIR" --save-interval-minutes 5 --keep-last-n 2
    --tensorboard-dir "$TB_DIR/stage$STAGE" --log-interval 1
    "${ARGS[@]}"
)
cluster_launch

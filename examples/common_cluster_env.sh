# shellcheck shell=bash
# Shared by examples/{pretrain_deepseek_7b,pretrain_deepseek_67b,sft_deepseek_7b,dpo_deepseek_67b}.sh (sourced,
# not run): the NCCL / InfiniBand environment, where the job runs (SLURM or plain torchrun), the script's
# own arguments, path checks, the dry-run plan and the launch.
#
# A script sources this, calls `parse_script_args "$@"`, sets MODEL, NUM_LAYERS, GLOBAL_BATCH, SEQ_LENGTH,
# LR and the layout defaults TP, PP, then either `pretrain_with_paper_recipe`, or `resolve_cluster`,
# `resolve_layout`, its own TRAIN_ARGS
# and calls `cluster_launch` (ENTRY_MODULE, SCHEDULE_DESC and BATCH_DESC describe a fine-tuning run).

# ---- NCCL and InfiniBand ------------------------------------------------------------------------------
# Each can be overridden from the environment; site-specific ones are only exported when given.

# One hardware work queue per GPU: kernels start in the order they are issued, so a sequence-parallel
# all-gather / reduce-scatter is scheduled ahead of the GEMM that waits on it (Megatron's TP/SP overlap
# ordering relies on this; without it the collective can queue behind the GEMM and serialize).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A rank whose NCCL call fails or times out aborts its process (torchrun then stops the job) instead of
# the other ranks hanging in the next collective until the wall-clock limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# WARN is quiet in normal runs; set NCCL_DEBUG=INFO once on a new cluster to see which NICs, rings and
# GPUDirect paths NCCL picked (and NCCL_DEBUG_SUBSYS=INIT,NET to narrow it).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The interface for NCCL's bootstrap and its TCP fallback: anything but loopback and container bridges,
# which are not routable between nodes (a wrong pick shows up as a hang at the first collective).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
# GPUDirect RDMA (NIC reads GPU memory directly) when NIC and GPU meet at most at the CPU's PCIe host
# bridge; HGX nodes put each GPU and its NIC under one PCIe switch, so this keeps GDR on for them. Set LOC
# to turn GDR off when debugging data corruption or hangs.
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
# InfiniBand retry timeout 4.096 us x 2^22 (~17 s) instead of NCCL's 2^20 (~4 s): on a large fabric a
# transient congestion spike should be retried, not reported as a fatal IB error that kills the job.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Which HCAs carry compute traffic, e.g. "mlx5_0,mlx5_1,...,mlx5_7" (one per GPU, the rails): leave out the
# storage / management NICs, which are slower and would cap every ring that lands on them.
if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
# RoCE only: the GID index of the RoCEv2 address (usually 3; `show_gids` lists them). InfiniBand ignores it.
if [[ -n "${NCCL_IB_GID_INDEX:-}" ]]; then export NCCL_IB_GID_INDEX; fi
# Fewer allocator fragments under the pipeline's uneven activation lifetimes (the planner's headroom
# assumes this).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# CPU threads per rank for the data loader and CPU ops (torchrun would otherwise set 1 with a warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

die() { echo "error: $*" >&2; exit 2; }

# ---- where we run --------------------------------------------------------------------------------------
# LAUNCHER=slurm: this script is the sbatch batch step; srun starts ONE task per node and each task runs
#   torchrun for the node's GPUS_PER_NODE ranks (torchrun sets LOCAL_RANK/RANK/WORLD_SIZE, watches its
#   workers and tears the node down when one dies; one srun task per GPU would need those set by hand and
#   loses torchrun's failure handling).
# LAUNCHER=torchrun: run the script once per node yourself with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
resolve_cluster() {
    if [[ -z "${LAUNCHER:-}" ]]; then
        if [[ -n "${SLURM_JOB_ID:-}" ]]; then LAUNCHER=slurm; else LAUNCHER=torchrun; fi
    fi
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    MASTER_PORT=${MASTER_PORT:-29500}
    case "$LAUNCHER" in
        slurm)
            NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
            # shellcheck disable=SC2016  # expanded by each srun task on its node, not here
            NODE_RANK='$SLURM_NODEID'
            if [[ -z "${MASTER_ADDR:-}" ]]; then
                if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
                    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
                elif [[ "$DRY_RUN" == 1 ]]; then
                    MASTER_ADDR=FIRST_HOST_OF_SLURM_JOB_NODELIST
                else
                    die "LAUNCHER=slurm outside a SLURM allocation (no SLURM_JOB_NODELIST); submit with sbatch or set LAUNCHER=torchrun"
                fi
            fi ;;
        torchrun)
            NNODES=${NNODES:-1}
            NODE_RANK=${NODE_RANK:-0}
            if [[ -z "${MASTER_ADDR:-}" ]]; then
                if [[ "$NNODES" -gt 1 && "$DRY_RUN" != 1 ]]; then
                    die "NNODES=$NNODES needs MASTER_ADDR (the host of NODE_RANK 0) and the same MASTER_PORT on every node"
                fi
                MASTER_ADDR=${MASTER_ADDR:-localhost}
            fi ;;
        *) die "LAUNCHER=$LAUNCHER: choose slurm or torchrun" ;;
    esac
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
}

# ---- layout ---------------------------------------------------------------------------------------------
resolve_layout() {
    (( WORLD_SIZE % (TP * PP) == 0 )) || die "world size $WORLD_SIZE (NNODES $NNODES x GPUS_PER_NODE $GPUS_PER_NODE) is not a multiple of TP $TP x PP $PP"
    (( TP <= GPUS_PER_NODE )) || die "TP $TP exceeds GPUS_PER_NODE $GPUS_PER_NODE: tensor parallelism must stay inside a node (NVLink)"
    DP=$((WORLD_SIZE / (TP * PP)))
    (( GLOBAL_BATCH % (MICRO_BATCH * DP) == 0 )) || die "GLOBAL_BATCH $GLOBAL_BATCH is not a multiple of MICRO_BATCH $MICRO_BATCH x DP $DP"
    NUM_MICROBATCHES=$((GLOBAL_BATCH / (MICRO_BATCH * DP)))
    # Uneven pipeline split: every stage ceil(L/PP) layers and the last one the rest, lighter because it also
    # runs the LM head (about one layer of work). This is planner.balanced_split for 67B at PP 4..32
    # (PP 8: 12 x 7 + 11); for other shapes take LAYER_SPLIT from tools/plan_layout.py.
    SPLIT_ARGS=()
    STAGE_SPLIT=${LAYER_SPLIT:-}
    if [[ -n "$STAGE_SPLIT" ]]; then
        SPLIT_ARGS=(--pipeline-layer-split "$STAGE_SPLIT")
    elif (( PP > 1 )); then
        local per=$(((NUM_LAYERS + PP - 1) / PP)) i
        local last=$((NUM_LAYERS - (PP - 1) * per))
        (( last >= 1 )) || die "PP $PP cannot split $NUM_LAYERS layers with the last stage lighter; set LAYER_SPLIT=a,b,... (tools/plan_layout.py prints one)"
        (( last == per )) || SPLIT_ARGS=(--decoder-last-pipeline-num-layers "$last")
        for ((i = 1; i < PP; i++)); do STAGE_SPLIT+="$per,"; done
        STAGE_SPLIT+="$last"
    fi
    # Sequence parallelism splits the TP group's activations; at TP 1 there is nothing to split.
    SP_ARGS=()
    if (( TP > 1 )); then SP_ARGS=(--sequence-parallel); fi
    TOKENS_PER_STEP=$((GLOBAL_BATCH * SEQ_LENGTH))
    TRAIN_TOKENS=${TRAIN_TOKENS:-2000000000000}
    TRAIN_ITERS=${TRAIN_ITERS:-$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))}
}

# A path from the environment, or a placeholder in a dry run.
require_env() {
    local name=$1 what=$2
    if [[ -z "${!name:-}" ]]; then
        [[ "$DRY_RUN" == 1 ]] || die "$name is not set: export $name=<$what>, or DRY_RUN=1 to print the plan"
        printf -v "$name" '%s' "/unset/$name"
    fi
}

# ---- the launch script's own arguments ------------------------------------------------------------
# --dry-run (or DRY_RUN=1) prints the plan and exits; every other argument is passed to the trainer.
parse_script_args() {
    DRY_RUN=${DRY_RUN:-0}
    ARGS=()
    local a
    for a in "$@"; do
        if [[ "$a" == --dry-run ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
    done
}

# ---- plan and launch ------------------------------------------------------------------------------------
cluster_launch() {
    local torchrun_args=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
                         --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    local cmd
    # ENTRY_MODULE: the entry point the ranks run (the fine-tuning scripts set megatron_ds.sft / megatron_ds.dpo).
    cmd="$(printf '%q ' "${torchrun_args[@]}")--node-rank $NODE_RANK -m ${ENTRY_MODULE:-megatron_ds.pretrain} $(printf '%q ' "${TRAIN_ARGS[@]}")"
    cmd=${cmd% }
    echo "plan: $MODEL, launcher $LAUNCHER, $NNODES node(s) x $GPUS_PER_NODE GPUs = world size $WORLD_SIZE"
    echo "layout: TP $TP x PP $PP x DP $DP${SP_ARGS[*]:+, sequence parallel}, ZeRO-1 over DP${SPLIT_ARGS[*]:+ (${SPLIT_ARGS[*]})}"
    # BATCH_DESC: scripts whose batch is not sequences (DPO: pairs of two sequences) describe it themselves.
    echo "batch: ${BATCH_DESC:-$GLOBAL_BATCH x $SEQ_LENGTH = $TOKENS_PER_STEP tokens/step}; micro-batch $MICRO_BATCH -> $NUM_MICROBATCHES micro-batches per DP rank"
    if [[ -n "${SCHEDULE_DESC:-}" ]]; then  # set by scripts whose schedule is not the pre-training one
        echo "schedule: $SCHEDULE_DESC"
    else
        echo "schedule: $TRAIN_ITERS steps = $((TRAIN_ITERS * TOKENS_PER_STEP)) tokens (target $TRAIN_TOKENS); lr $LR, 2000 warmup, multistep x0.316 @80% x0.1 @90%"
    fi
    if [[ "$LAUNCHER" == slurm ]]; then
        echo "launch: srun --nodes $NNODES --ntasks-per-node 1 bash -c '<command>' (NODE_RANK = \$SLURM_NODEID per task)"
    fi
    echo "command: $cmd"
    if [[ "$DRY_RUN" == 1 && "${ESTIMATE:-1}" == 1 ]]; then
        # The planner's memory and step-time estimate for exactly this layout (GPU_TYPE: a100, h100, h200).
        local split=()
        if [[ -n "$STAGE_SPLIT" ]]; then split=(--split "$STAGE_SPLIT"); fi
        echo "estimate: $(python tools/plan_layout.py --model "$MODEL" --gpus "$WORLD_SIZE" --gpus-per-node "$GPUS_PER_NODE" \
            --gpu "${GPU_TYPE:-h100}" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH" \
            --layout "$TP" "$PP" "$MICRO_BATCH" "${split[@]}" 2>&1 || true)"
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        return 0
    fi
    if [[ "$LAUNCHER" == slurm ]]; then
        # --kill-on-bad-exit: one node's torchrun failing ends the step instead of leaving the rest hung.
        srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c "cd $(printf '%q' "$PWD") && exec $cmd"
    else
        # shellcheck disable=SC2086  # $cmd was quoted by printf %q above
        eval exec $cmd
    fi
}

# ---- the paper's recipe --------------------------------------------------------------------------------
# Both model scripts set MODEL, NUM_LAYERS, SEQ_LENGTH, GLOBAL_BATCH, LR, TP, PP, MICRO_BATCH and ARGS
# (extra flags), then call this: AdamW 0.9/0.95, weight decay 0.1, clip 1.0, init std 0.006, 2000 warmup
# steps, multi-step LR (x0.316 at 80%, x0.1 at 90%), bf16, ZeRO-1 with its parameter all-gather
# overlapping the forward, checkpoints every 5 minutes.
pretrain_with_paper_recipe() {
    require_env DATA_PATH "prefix of the .bin/.idx written by tools/preprocess_data.py"
    require_env TOKENIZER "tokenizer.json"
    require_env CKPT_DIR "checkpoint directory"
    require_env TB_DIR "TensorBoard directory"
    resolve_cluster
    resolve_layout

    read -r -a DATA_ARGS <<< "$DATA_PATH"
    TRAIN_ARGS=(
        --model "$MODEL"
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${SPLIT_ARGS[@]}"
        "${SP_ARGS[@]}" --use-distributed-optimizer --overlap-param-gather --bf16
        --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
        --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
        --lr "$LR" --lr-warmup-iters 2000 --lr-decay-style multistep
        --lr-decay-milestones "0.8,0.9" --lr-decay-factors "0.316,0.1"
        --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --init-method-std 0.006
        --data-path "${DATA_ARGS[@]}" --tokenizer-model "$TOKENIZER"
        --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval-minutes 5 --keep-last-n 3
        --tensorboard-dir "$TB_DIR" --log-interval 1 --eval-interval 1000 --eval-iters 10
        "${ARGS[@]}"
    )
    cluster_launch
}

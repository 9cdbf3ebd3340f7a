#!/usr/bin/env bash
# Tiny end-to-end SFT demo on a CPU-only machine (a few minutes on 2 cores): generated conversations
# (sums spelled out, some with a follow-up turn) -> a byte-level BPE -> tools/preprocess_sft.py (DeepSeek
# chat template, loss on the assistant replies only) -> SFT of a 2-layer model from random initialization
# at TP 2 x DP 2 (4 processes, gloo), conversations packed into 128-token samples -> a second stage on
# multi-turn conversations only, loading the first stage's checkpoint. Watch "lm loss" (the mean over
# assistant tokens) fall and the held-out conversations' loss at each validation; after each stage the
# model answers "what is 12 plus 30?" (greedy, in the chat template).
#
#   bash examples/sft_tiny.sh                      # generated conversations
#   bash examples/sft_tiny.sh my_chats.jsonl       # your own {"messages": [...]} or {"prompt", "response"} jsonl
#
# Environment: OUT_DIR (default runs/sft_tiny), EPOCHS (default 3), STAGE2_EPOCHS (default 1; 0 skips the
# second stage), NPROC (default 4; TP 2, the data-parallel size is NPROC / 2), TEMPLATE (deepseek or chatml).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-runs/sft_tiny}
EPOCHS=${EPOCHS:-3}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-1}
NPROC=${NPROC:-4}
TEMPLATE=${TEMPLATE:-deepseek}
CHATS=${1:-}
mkdir -p "$OUT_DIR"

VALID_ARGS=()
if [[ -z "$CHATS" ]]; then
    CHATS="$OUT_DIR/train.jsonl"
    python examples/sft_conversations.py --output "$CHATS" --conversations 3000 \
        --valid-output "$OUT_DIR/valid.jsonl" --text-output "$OUT_DIR/corpus.jsonl"
    python examples/sft_conversations.py --output "$OUT_DIR/follow_up.jsonl" --conversations 600 \
        --follow-up-only --seed 1
    VALID_ARGS=(--valid-data-path "$OUT_DIR/valid" --eval-interval 40 --eval-iters 2)
elif [[ ! -f "$CHATS" ]]; then
    echo "error: $CHATS not found; pass a jsonl with one {\"messages\": [...]} or {\"prompt\", \"response\"} per line" >&2
    exit 2
else
    # The tokenizer learns from every message of the file.
    python -c 'import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        msgs = r.get("messages") or [{"content": r["prompt"] if isinstance(r["prompt"], str) else " ".join(
            m["content"] for m in r["prompt"])}, {"content": r["response"]}]
        out.write(json.dumps({"text": "User: Assistant: " + "\n\n".join(m["content"] for m in msgs)}) + "\n")' \
        "$CHATS" "$OUT_DIR/corpus.jsonl"
    STAGE2_EPOCHS=0
fi

# A 320-token byte-level BPE (digits split): the model's vocabulary pads it to 512 at TP 2.
python tools/train_tokenizer.py --input "$OUT_DIR/corpus.jsonl" --vocab-size 320 --output "$OUT_DIR/tokenizer.json"
python tools/preprocess_sft.py --input "$CHATS" --output-prefix "$OUT_DIR/train" \
    --tokenizer-model "$OUT_DIR/tokenizer.json" --chat-template "$TEMPLATE"
if [[ ${#VALID_ARGS[@]} -gt 0 ]]; then
    python tools/preprocess_sft.py --input "$OUT_DIR/valid.jsonl" --output-prefix "$OUT_DIR/valid" \
        --tokenizer-model "$OUT_DIR/tokenizer.json" --chat-template "$TEMPLATE"
fi

# One thread per rank: the ranks share 2 cores.
export OMP_NUM_THREADS=1
MODEL_ARGS=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4 --num-query-groups 2
            --vocab-size 320 --seq-length 128 --max-position-embeddings 128 --tensor-model-parallel-size 2
            --micro-batch-size 4 --global-batch-size 16 --weight-decay 0.0 --clip-grad 1.0
            --tokenizer-model "$OUT_DIR/tokenizer.json" --chat-template "$TEMPLATE" --log-interval 10
            --generate-prompt "what is 12 plus 30?" --generate-tokens 12)

echo "== stage 1: $EPOCHS epochs over $CHATS"
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_ds.sft "${MODEL_ARGS[@]}" \
    --data-path "$OUT_DIR/train" "${VALID_ARGS[@]}" --epochs "$EPOCHS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
    --tensorboard-dir "$OUT_DIR/tensorboard/stage1" --save "$OUT_DIR/stage1"

if [[ "$STAGE2_EPOCHS" -gt 0 ]]; then
    python tools/preprocess_sft.py --input "$OUT_DIR/follow_up.jsonl" --output-prefix "$OUT_DIR/follow_up" \
        --tokenizer-model "$OUT_DIR/tokenizer.json" --chat-template "$TEMPLATE"
    echo "== stage 2: $STAGE2_EPOCHS epoch(s) of multi-turn conversations only, from the stage 1 weights"
    python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_ds.sft "${MODEL_ARGS[@]}" \
        --data-path "$OUT_DIR/follow_up" "${VALID_ARGS[@]}" --epochs "$STAGE2_EPOCHS" \
        --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 2 --lr-decay-style cosine \
        --load "$OUT_DIR/stage1" --tensorboard-dir "$OUT_DIR/tensorboard/stage2" --save "$OUT_DIR/stage2"
fi

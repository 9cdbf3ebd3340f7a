#!/usr/bin/env bash
# Tiny end-to-end DPO demo on a CPU-only machine (about 2-4 minutes on 2 cores): a generated preference
# dataset (count up from a digit: the chosen reply does, the rejected one breaks the rule once) -> a
# byte-level BPE -> DPO of a 2-layer model from random initialization against its frozen copy, on 2
# processes (gloo). Watch "preference accuracy" (the fraction of pairs whose chosen reply gets the higher
# implicit reward) rise from ~0.5, and the held-out pairs' accuracy at each validation.
#
#   bash examples/dpo_tiny.sh                         # generated pairs
#   bash examples/dpo_tiny.sh my_pairs.jsonl          # your own {"prompt", "chosen", "rejected"} jsonl
#
# Environment: OUT_DIR (default runs/dpo_tiny), TRAIN_ITERS (default 200), NPROC (default 2), PP (default 1;
# the data-parallel size is NPROC / PP), PRECOMPUTE=1 to precompute the reference log-probs once and free
# the reference model (default: a reference forward pass every step).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-runs/dpo_tiny}
TRAIN_ITERS=${TRAIN_ITERS:-200}
NPROC=${NPROC:-2}
PP=${PP:-1}
PAIRS=${1:-}
mkdir -p "$OUT_DIR"

VALID_ARGS=()
if [[ -z "$PAIRS" ]]; then
    PAIRS="$OUT_DIR/pairs.jsonl"
    python examples/dpo_pairs.py --output "$PAIRS" --pairs 4000 --valid-output "$OUT_DIR/valid.jsonl" \
        --valid-pairs 128 --text-output "$OUT_DIR/corpus.txt"
    VALID_ARGS=(--dpo-valid-data "$OUT_DIR/valid.jsonl" --eval-interval 50 --eval-iters 4)
    TOKENIZER_INPUT="$OUT_DIR/corpus.txt"
elif [[ ! -f "$PAIRS" ]]; then
    echo "error: $PAIRS not found; pass a jsonl with one {\"prompt\", \"chosen\", \"rejected\"} per line" >&2
    exit 2
else
    # The tokenizer learns from every prompt and reply of the file.
    TOKENIZER_INPUT="$OUT_DIR/corpus.txt"
    python -c 'import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        p = r["prompt"] if isinstance(r["prompt"], str) else " ".join(m["content"] for m in r["prompt"])
        out.write("User: %s\n\nAssistant: %s\n%s\n" % (p, r["chosen"], r["rejected"]))' "$PAIRS" "$TOKENIZER_INPUT"
fi
PRECOMPUTE_ARGS=()
if [[ "${PRECOMPUTE:-0}" == 1 ]]; then PRECOMPUTE_ARGS=(--dpo-precompute-ref); fi

# A 320-token byte-level BPE (digits split): the model's vocabulary pads it to 384.
python tools/train_tokenizer.py --input "$TOKENIZER_INPUT" --vocab-size 320 --output "$OUT_DIR/tokenizer.json"

# One thread per rank: the ranks share 2 cores. --micro-batch-size and --global-batch-size count pairs
# (each is two sequences, chosen and rejected, in the same micro-batch).
export OMP_NUM_THREADS=1
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_ds.dpo \
    --num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4 --num-query-groups 2 \
    --vocab-size 384 --seq-length 64 --max-position-embeddings 64 \
    --pipeline-model-parallel-size "$PP" \
    --micro-batch-size 8 --global-batch-size 32 \
    --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-5 --lr-warmup-iters 10 --lr-decay-style cosine \
    --weight-decay 0.0 --clip-grad 1.0 \
    --dpo-data "$PAIRS" "${VALID_ARGS[@]}" --dpo-beta 0.1 "${PRECOMPUTE_ARGS[@]}" \
    --tokenizer-model "$OUT_DIR/tokenizer.json" \
    --log-interval 10 --tensorboard-dir "$OUT_DIR/tensorboard" --save "$OUT_DIR/checkpoint"

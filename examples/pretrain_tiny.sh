#!/usr/bin/env bash
# Tiny end-to-end pre-training demo on a CPU-only machine (about 3-5 minutes on 2 cores):
# corpus -> tokenizer -> .bin/.idx -> TP=2 x PP=2 x DP=2 with sequence parallelism and the 1F1B
# pipeline schedule (8 processes, gloo) -> TensorBoard logs, a checkpoint, and a generated continuation.
#
#   bash examples/pretrain_tiny.sh                 # corpus from the Python standard library
#   bash examples/pretrain_tiny.sh my_corpus.jsonl # your own jsonl, one {"text": ...} per line
#
# Environment: OUT_DIR (default runs/tiny), TRAIN_ITERS (default 300), NPROC (default 8), PP (default 2);
# the data-parallel size is NPROC / (2 * PP).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-runs/tiny}
TRAIN_ITERS=${TRAIN_ITERS:-300}
NPROC=${NPROC:-8}
PP=${PP:-2}
CORPUS=${1:-}
mkdir -p "$OUT_DIR"

if [[ -z "$CORPUS" ]]; then
    CORPUS="$OUT_DIR/stdlib.jsonl"
    [[ -f "$CORPUS" ]] || python examples/stdlib_corpus.py --output "$CORPUS" --max-mb 4
elif [[ ! -f "$CORPUS" ]]; then
    echo "error: corpus $CORPUS not found; pass a jsonl file with one {\"text\": ...} per line" >&2
    exit 2
fi

# A 4096-token byte-level BPE with digits split, as the tiny preset's vocabulary.
python tools/train_tokenizer.py --input "$CORPUS" --vocab-size 4096 --output "$OUT_DIR/tokenizer.json"
python tools/preprocess_data.py --input "$CORPUS" --output-prefix "$OUT_DIR/corpus" \
    --tokenizer-model "$OUT_DIR/tokenizer.json" --append-eod --workers 2

# One thread per rank: 8 ranks share 2 cores.
export OMP_NUM_THREADS=1
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_ds.pretrain \
    --model tiny \
    --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size "$PP" \
    --micro-batch-size 4 --global-batch-size 16 --seq-length 128 \
    --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 \
    --data-path "$OUT_DIR/corpus_text_document" --split 98,2,0 \
    --tokenizer-model "$OUT_DIR/tokenizer.json" \
    --log-interval 20 --eval-interval 100 --eval-iters 4 \
    --tensorboard-dir "$OUT_DIR/tensorboard" --save "$OUT_DIR/checkpoint" \
    --generate-prompt "def main(" --generate-tokens 48

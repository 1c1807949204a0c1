#!/usr/bin/env bash
# Sentence-level vs response-level vs token-level reward models, trained identically, against the endogenous
# reward of the same backbone: pairwise accuracy on the HH held-out pairs and the five LLMBar sets, one table,
# mean and spread over seeds.
#
#   bash bench/rm_comparison.sh            # the real run, seeds 0 1 2: ~50 min on the idle 2-core CPU machine
#
# Measured here (bf16, idle machine): training 50 steps (2 workers x 4 pairs, 256 tokens, top 2 layers training)
# plus scoring 649 pairs takes ~6.5 min for the sentence RM (its <END> embedding trains, so the backward pass runs
# through all 30 layers) and ~3.6 min for each baseline; the endogenous reward scores 1,298 rows in ~4 min.
#
# Identical for the three kinds: backbone (the bundled SmolLM2-135M-Instruct), data (hh_harmless_base_test.jsonl
# minus its held-out 10%, split by the seed; the first MAX_PAIRS training pairs), 1 epoch, the same steps (2 Ray
# Train workers x batch 4 pairs, ZeRO-2, AdamW lr LR), the same seed. A seed picks the held-out split, the
# training pairs, their order and the heads' initialisation. Budget choices, stated in the table header:
# the embeddings and the lowest FREEZE of the 30 layers are frozen (the top 2 layers, the heads and the sentence
# RM's <END> embedding train), every side is cut to MAX_LENGTH tokens, and everything runs in DTYPE (bf16 was
# 3.5x faster than fp32 for a forward pass on this CPU, which has avx512_bf16). The endogenous reward
# (jobs.eval_rewards --judge false: training-free) scores the same pairs with the same backbone, DTYPE and
# MAX_LENGTH-token window: each seed's held-out pairs, and LLMBar once (it has no seed). Everything is
# overridable from the environment, e.g. a smoke test on a tiny model:
#
#   MODEL=/tmp/tiny FREEZE=1 MAX_PAIRS=8 SEEDS="0 1" EXTRA="--rm.attn_dim 16" OUT=/tmp/rm_smoke bash bench/rm_comparison.sh
#
# Writes OUT/seed<S>/<kind>/ (train_rm runs), OUT/seed<S>/endogenous/ and OUT/endogenous_llmbar/ (eval_rewards),
# a log beside each, and OUT/comparison.md (bench/rm_comparison_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m-instruct}
DATA=${DATA:-../shared/data/hh_harmless_base_test.jsonl}
LLMBAR=${LLMBAR:-../shared/data/llmbar}
OUT=${OUT:-runs/rm_comparison}
MAX_PAIRS=${MAX_PAIRS:-400}
FREEZE=${FREEZE:-28}
MAX_LENGTH=${MAX_LENGTH:-256}
LR=${LR:-1e-4}
DTYPE=${DTYPE:-bfloat16}
SEEDS=${SEEDS:-0 1 2}
EXTRA=${EXTRA:-}
EVAL_DATA=$LLMBAR/Natural.json,$LLMBAR/Adversarial_Neighbor.json,$LLMBAR/Adversarial_GPTInst.json,$LLMBAR/Adversarial_GPTOut.json,$LLMBAR/Adversarial_Manual.json
export HF_HUB_OFFLINE=1

rm -rf "$OUT"
mkdir -p "$OUT"

run() {  # run NAME COMMAND...: log to OUT/NAME.log, show its tail if it fails
    local name=$1 started=$SECONDS
    shift
    echo "== $name (log: $OUT/$name.log)"
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        tail -40 "$OUT/$name.log"
        echo "FAILED: $name" >&2
        exit 1
    fi
    echo "   done in $((SECONDS - started)) s"
}

for seed in $SEEDS; do
    mkdir -p "$OUT/seed$seed"
    for kind in sentence response token; do
        # shellcheck disable=SC2086  # EXTRA is a list of flags
        run "seed$seed/$kind" "$PYTHON" -m jobs.train_rm --data "$DATA" --rm.kind "$kind" --model.name "$MODEL" \
            --seed "$seed" --heldout_fraction 0.1 --max_pairs "$MAX_PAIRS" --rm.freeze_layers "$FREEZE" \
            --train.max_length "$MAX_LENGTH" --train.lr "$LR" --train.epochs 1 --train.batch_size 4 \
            --train.grad_accum 1 --train.workers 2 --train.zero_stage 2 --train.dtype "$DTYPE" \
            --eval_data "$EVAL_DATA" --storage "$OUT/seed$seed/$kind" --ray.address local $EXTRA
    done
    # this seed's held-out pairs, as train_rm wrote them (the split depends only on DATA and the seed)
    run "seed$seed/endogenous" "$PYTHON" -m jobs.eval_rewards --judge false \
        --data "$OUT/seed$seed/sentence/heldout_pairs.jsonl" --model.name "$MODEL" --model.dtype "$DTYPE" \
        --model.max_length "$MAX_LENGTH" --output "$OUT/seed$seed/endogenous" --ray.address local
done
run endogenous_llmbar "$PYTHON" -m jobs.eval_rewards --judge false --data "$EVAL_DATA" --model.name "$MODEL" \
    --model.dtype "$DTYPE" --model.max_length "$MAX_LENGTH" --output "$OUT/endogenous_llmbar" --ray.address local

# shellcheck disable=SC2086  # SEEDS is a list
"$PYTHON" bench/rm_comparison_table.py "$OUT" "$MODEL" "$FREEZE" "$MAX_LENGTH" "$LR" "$DTYPE" $SEEDS
echo "wrote $OUT/comparison.md"

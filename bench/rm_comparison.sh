#!/usr/bin/env bash
# Sentence-level vs response-level vs token-level reward models, trained identically, against the endogenous
# reward of the same backbone: pairwise accuracy on the HH held-out pairs and the five LLMBar sets, one table.
#
#   bash bench/rm_comparison.sh            # the real run: ~25 min on the idle 2-core CPU machine, more when shared
#
# Measured here (bf16, idle machine): a training step (2 workers x 4 pairs, 256 tokens, top 2 layers training)
# 4.5 s for the sentence RM (its <END> embedding trains, so the backward pass runs through all 30 layers) and
# 3.3 s for the response RM; scoring 650 pairs about 1.7 min per RM; jobs.eval_rewards about 0.4 s per row
# (1,298 rows). Budget: 3 x (50 steps + scoring + ~1 min start) + ~9 min endogenous.
#
# Identical for the three kinds: backbone (the bundled SmolLM2-135M-Instruct), data (hh_harmless_base_test.jsonl
# minus its held-out 10%, split by SEED; the first MAX_PAIRS training pairs), 1 epoch, the same steps (2 Ray
# Train workers x batch 4 pairs, ZeRO-2, AdamW lr LR), the same seed. Budget choices, stated in the table header:
# the embeddings and the lowest FREEZE of the 30 layers are frozen (the top 2 layers, the heads and the sentence
# RM's <END> embedding train), every side is cut to MAX_LENGTH tokens, and everything runs in DTYPE (bf16 was
# 3.5x faster than fp32 for a forward pass on this CPU, which has avx512_bf16). The endogenous reward
# (jobs.eval_rewards --judge false: training-free) scores the same pairs with the same backbone, DTYPE and
# MAX_LENGTH-token window. Everything is overridable from the environment, e.g. a smoke test on a tiny model:
#
#   MODEL=/tmp/tiny FREEZE=1 MAX_PAIRS=8 EXTRA="--rm.attn_dim 16" OUT=/tmp/rm_smoke bash bench/rm_comparison.sh
#
# Writes OUT/<kind>/ (train_rm runs), OUT/endogenous/ (eval_rewards), OUT/*.log and OUT/comparison.md.
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
SEED=${SEED:-0}
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

for kind in sentence response token; do
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    run "$kind" "$PYTHON" -m jobs.train_rm --data "$DATA" --rm.kind "$kind" --model.name "$MODEL" --seed "$SEED" \
        --heldout_fraction 0.1 --max_pairs "$MAX_PAIRS" --rm.freeze_layers "$FREEZE" --train.max_length "$MAX_LENGTH" \
        --train.lr "$LR" --train.epochs 1 --train.batch_size 4 --train.grad_accum 1 --train.workers 2 \
        --train.zero_stage 2 --train.dtype "$DTYPE" --eval_data "$EVAL_DATA" --output "$OUT/$kind" \
        --ray.address local $EXTRA
done

# the same held-out pairs (train_rm wrote them; the split depends only on DATA and SEED) and LLMBar sets
run endogenous "$PYTHON" -m jobs.eval_rewards --judge false --data "$OUT/sentence/heldout_pairs.jsonl,$EVAL_DATA" \
    --model.name "$MODEL" --model.dtype "$DTYPE" --model.max_length "$MAX_LENGTH" --output "$OUT/endogenous" --ray.address local

"$PYTHON" - "$OUT" "$MODEL" "$FREEZE" "$MAX_LENGTH" "$LR" "$DTYPE" <<'EOF'
"""One table: the three trained kinds and the endogenous reward, accuracy (%) per set."""
import json
import sys

out, model, freeze, max_length, lr, dtype = sys.argv[1:]
rows = {}
for kind in ("sentence", "response", "token"):
    with open(f"{out}/{kind}/results.json") as fh:
        result = json.load(fh)
    rows[f"{kind}-level RM"] = (result["accuracy"][f"{kind} RM"], result["counts"])
    trained = result["trained_pairs"]
with open(f"{out}/endogenous/results.json") as fh:
    result = json.load(fh)
rows["endogenous reward (sum, no training)"] = (result["accuracy"]["endogenous (sum)"], result["counts"])

llmbar = ["Natural", "Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut", "Adversarial_Manual"]
counts = rows["sentence-level RM"][1]
for name, (_, other) in rows.items():
    assert other == counts, f"{name} was evaluated on other pairs: {other} vs {counts}"
header = ["heldout"] + llmbar + ["LLMBar (all 5)"]
lines = [f"Pairwise accuracy (%), backbone `{model}` in {dtype}. Trained RMs: {trained} HH-harmless pairs, 1 epoch, "
         f"lr {lr}, embeddings + lowest {freeze} layers frozen, sides cut to {max_length} tokens; the endogenous "
         f"reward sees the same {max_length}-token window. heldout = the HH pairs no RM trained on.", "",
         "| reward | " + " | ".join(f"{c} (n={counts.get(c, sum(counts[s] for s in llmbar))})" for c in header) + " |",
         "|---|" + "---|" * len(header)]
for name, (accuracy, _) in rows.items():
    pooled = sum(accuracy[s] * counts[s] for s in llmbar) / sum(counts[s] for s in llmbar)  # pair-weighted
    cells = [accuracy[c] for c in header[:-1]] + [pooled]
    lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")
table = "\n".join(lines)
with open(f"{out}/comparison.md", "w") as fh:
    fh.write(table + "\n")
print(table)
EOF
echo "wrote $OUT/comparison.md"

#!/usr/bin/env bash
# LoRA fine-tuning with AdamW against Muon, same steps, two peak LRs each, on a GPT-2 124M pretrained
# for 300 steps on the books corpus (random init: no hub weights). Run from the repository root:
#   BOOKS=path/books.jsonl.xz INSTRUCTIONS=path/instructions.jsonl.xz bash bench/lora_muon.sh
# Logs and the summary go to $OUT (default out/lora_muon). Every size is an env var. Estimated: under 4
# minutes on one H100 (tokenize ~20 s, pretrain ~70 s eager, 4 LoRA runs of 200 steps ~25 s each).
# CPU smoke: DEVICE=cpu N_LAYER=2 N_HEAD=2 N_EMBD=32 BLOCK=256 PRE_STEPS=6 PRE_BATCH=4 TOTAL_BATCH=1024 \
#   MAX_TOKENS=200000 VAL_TOKENS=8192 ROWS=600 FT_STEPS=6 FT_EVAL=3 FT_BATCH=8 EVAL_EXAMPLES=16 bash bench/lora_muon.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python}
OUT=${OUT:-out/lora_muon}
BOOKS=${BOOKS:?BOOKS: a .jsonl[.xz] corpus with a text field}
INSTRUCTIONS=${INSTRUCTIONS:?INSTRUCTIONS: a .jsonl[.xz] in the Dolly schema}
DATA=${DATA:-/tmp/books}          # the shards: a second run with the same options finds them done
DOLLY=${DOLLY:-/tmp/wiki-dolly}
WORK=${WORK:-/tmp/lora_muon}      # checkpoints (not copied back)
DEVICE=${DEVICE:-cuda}
N_LAYER=${N_LAYER:-12}; N_HEAD=${N_HEAD:-12}; N_EMBD=${N_EMBD:-768}; BLOCK=${BLOCK:-1024}
PRE_STEPS=${PRE_STEPS:-300}; PRE_BATCH=${PRE_BATCH:-64}; TOTAL_BATCH=${TOTAL_BATCH:-65536}
FT_STEPS=${FT_STEPS:-200}; FT_EVAL=${FT_EVAL:-50}; FT_BATCH=${FT_BATCH:-32}; EVAL_EXAMPLES=${EVAL_EXAMPLES:-100000}
ADAMW_LRS=${ADAMW_LRS:-"3e-4 1e-3"}   # 3e-4: the LoRA default
MUON_LRS=${MUON_LRS:-"0.01 0.03"}     # 0.01: the default --muon-lr for LoRA (3e-4 x 33.3)
LORA_RANK=${LORA_RANK:-8}
mkdir -p "$OUT" "$WORK"
stamp() { echo "[$(date +%T)] $*" | tee -a "$OUT/stages.txt"; }

stamp "tokenize $BOOKS -> $DATA"
$PY fineweb.py --input "$BOOKS" --out-dir "$DATA" --prefix books --shard-size 10000000 \
    --val-tokens "${VAL_TOKENS:-2000000}" ${MAX_TOKENS:+--max-tokens $MAX_TOKENS} --workers "${WORKERS:-16}" \
    --no-progress 2>&1 | tee "$OUT/fineweb.txt"

stamp "pretrain $PRE_STEPS steps (Muon default, eager)"
$PY train_gpt2.py --data-dir "$DATA" --out-dir "$WORK/pretrain" --overwrite --device "$DEVICE" --no-compile \
    --n-layer "$N_LAYER" --n-head "$N_HEAD" --n-embd "$N_EMBD" --block-size "$BLOCK" --batch-size "$PRE_BATCH" \
    --total-batch-size "$TOTAL_BATCH" --max-steps "$PRE_STEPS" --warmup-steps $((PRE_STEPS / 10)) \
    --eval-interval $((PRE_STEPS / 3)) --eval-steps 8 --ckpt-interval 0 --sample-tokens 0 --no-plot \
    --log-interval 25 2>&1 | tee "$OUT/pretrain.txt"
cp "$WORK/pretrain/log.jsonl" "$OUT/pretrain_log.jsonl"

stamp "prepare $INSTRUCTIONS -> $DOLLY"
$PY prepare_dolly.py --input "$INSTRUCTIONS" --out-dir "$DOLLY" --max-len "$BLOCK" ${ROWS:+--limit $ROWS} \
    --no-progress 2>&1 | tee "$OUT/prepare.txt"

finetune() {  # name, then the optimizer flags
    local name=$1; shift
    stamp "LoRA $name"
    $PY finetune_dolly.py --data-dir "$DOLLY" --init-from "$WORK/pretrain" --out-dir "$WORK/$name" --overwrite \
        --device "$DEVICE" --no-compile --lora-rank "$LORA_RANK" --max-steps "$FT_STEPS" --eval-interval "$FT_EVAL" \
        --ckpt-interval 0 --batch-size "$FT_BATCH" --examples-per-step "$FT_BATCH" --eval-examples "$EVAL_EXAMPLES" \
        --sample-count 0 --sample-tokens 0 --log-interval 10 --no-plot "$@" 2>&1 | tee "$OUT/$name.txt"
    cp "$WORK/$name/log.jsonl" "$OUT/${name}_log.jsonl"
}
for lr in $ADAMW_LRS; do finetune "adamw_$lr" --optimizer adamw --lr "$lr"; done
for lr in $MUON_LRS; do finetune "muon_$lr" --optimizer muon --muon-lr "$lr"; done
stamp "done"

# the table: val loss at every evaluation, mean tokens/s (padded tokens), time; then one JSON line
$PY - "$OUT" $(for lr in $ADAMW_LRS; do echo "adamw_$lr"; done) $(for lr in $MUON_LRS; do echo "muon_$lr"; done) <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
runs = {}
for name in names:
    rows = [json.loads(line) for line in open(f"{out}/{name}_log.jsonl")]
    val = {r["step"]: round(r["val_loss"], 4) for r in rows if "val_loss" in r}
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:] or [0]  # the first line holds the warm-up
    runs[name] = {"val_loss": val, "best_val_loss": min(val.values()), "tokens_per_sec": round(sum(tps) / len(tps)),
                  "elapsed_s": rows[-1]["elapsed_s"]}
steps = sorted({s for r in runs.values() for s in r["val_loss"]})
print(f"{'run':<14}" + "".join(f"{'val@' + str(s):>10}" for s in steps) + f"{'best':>9}{'tokens/s':>11}{'wall s':>8}")
for name, r in runs.items():
    print(f"{name:<14}" + "".join(f"{r['val_loss'].get(s, float('nan')):>10.4f}" for s in steps)
          + f"{r['best_val_loss']:>9.4f}{r['tokens_per_sec']:>11,}{r['elapsed_s']:>8.1f}")
print(json.dumps({"runs": runs}))
PYEOF

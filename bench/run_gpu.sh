#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md. Usage: bash bench/run_gpu.sh STAGE...  (stages below, in order given).
# Inputs (environment): CORPUS (jsonl[.xz] with a `text` field), HELLASWAG (HellaSwag val .jsonl[.xz]),
# INSTRUCTIONS (Dolly-schema .jsonl[.xz]). Logs go to $OUT (default out/gpu-logs), shards to $DATA.
set -uo pipefail
OUT=${OUT:-out/gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA=${DATA:-data/books}
NPROC=${NPROC:-1}

stage_env() {  # what the figures were measured on
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
}
stage_tokenize() {  # the corpus -> llm.c shards: 2M val tokens, 10M-token train shards
  [ -f "$DATA/.done" ] && return 0
  python3 fineweb.py --input "$CORPUS" --out-dir "$DATA" --prefix books \
    --shard-size 10000000 --val-tokens 2000000 --workers 16 --no-progress && touch "$DATA/.done"
}
stage_throughput() {  # training step throughput (tokens/s, MFU, peak memory): B = 16/32/64, compiled, real shards
  python3 bench/time_to_loss.py --data-dir "$DATA" --out-dir "$OUT/throughput${TAG:-}" --total-batch-size 524288 \
    --max-steps ${STEPS:-10} --eval-interval ${STEPS:-10} --eval-steps 1 \
    --runs "${RUNS:-adamw:batch_size=16,adamw:batch_size=32,adamw:batch_size=64}" ${THROUGHPUT_ARGS:-} | tee "$OUT/throughput${TAG:-}.txt"
}
stage_time_to_loss() {  # each optimizer's time to the first AdamW run's final val loss (300 steps of 131,072 tokens)
  python3 bench/time_to_loss.py --data-dir "$DATA" --out-dir "$OUT/time_to_loss${TAG:-}" --runs "${RUNS:-adamw,muon}" \
    ${TTL_ARGS:-} | tee "$OUT/time_to_loss${TAG:-}.txt"
}
stage_generate() {  # decoding: ours (CUDA graphs) vs transformers, batch 1/8/32
  python3 bench/generate.py --batch-sizes 1,8,32 ${GENERATE_ARGS:-} | tee "$OUT/generate${TAG:-}.txt"
}
stage_prefill() {  # prompt tokens/s and a lone 1,000-token prompt's first token per prefill budget; eager/graph/compile
  python3 bench/prefill.py ${PREFILL_ARGS:-} | tee "$OUT/prefill${TAG:-}.txt"
}
stage_serve() {  # server vs engine at 64 clients, newcomer, embeddings and long-prompt bursts, chat and loglik (cache on/off)
  python3 bench/serve_load.py --duration 20 ${SERVE_ARGS:-} | tee "$OUT/serve_load${TAG:-}.txt"
}
stage_pretrain() {  # GPT-2 124M on the corpus: val loss and HellaSwag curve
  local hs=""
  [ "${HS_LIMIT:-2000}" != 0 ] && hs="--hellaswag $HELLASWAG --hellaswag-limit ${HS_LIMIT:-2000}"
  torchrun --standalone --nproc_per_node=$NPROC train_gpt2.py --data-dir "$DATA" --out-dir ${PRETRAIN_OUT:-out/pretrain} \
    --max-steps ${STEPS:-300} --warmup-steps ${WARMUP:-30} --total-batch-size ${TOTAL:-131072} \
    --eval-interval ${EVAL:-50} --eval-steps 20 $hs --ckpt-interval ${CKPT:-0} \
    --log-interval 10 ${PRETRAIN_ARGS:-} 2>&1 | tee "$OUT/pretrain${TAG:-}.txt"
  cp ${PRETRAIN_OUT:-out/pretrain}/log.jsonl "$OUT/pretrain${TAG:-}_log.jsonl" 2>/dev/null
  cp ${PRETRAIN_OUT:-out/pretrain}/loss.png "$OUT/pretrain${TAG:-}_loss.png" 2>/dev/null
  return 0
}
stage_finetune() {  # the pretrained model on the instruction set
  python3 prepare_dolly.py --input "$INSTRUCTIONS" --out-dir data/instructions --no-progress
  python3 finetune_dolly.py --data-dir data/instructions --init-from ${PRETRAIN_OUT:-out/pretrain}/ckpt.pt \
    --out-dir out/instructions-sft --sample-count 5 --overwrite ${FINETUNE_ARGS:-} 2>&1 | tee "$OUT/finetune.txt"
  cp out/instructions-sft/log.jsonl "$OUT/finetune_log.jsonl"; cp out/instructions-sft/samples.jsonl "$OUT/finetune_samples.jsonl"
  return 0
}

for s in "$@"; do
  echo "=== stage $s ($(date -u +%H:%M:%S))"
  "stage_$s"
done
echo "=== done ($(date -u +%H:%M:%S))"

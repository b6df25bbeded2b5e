#!/usr/bin/env bash
# (a) generation, (c) DPO and (d) SFT on a GPU machine, in one command, on the 270M model's architecture and
# tokenizer with random weights (benchmarks/random_checkpoint.py says why and what that changes).
#
# Prepare on a machine that has the model (the results say which versions ran):
#   python -m benchmarks.random_checkpoint shape embedded:gemma3-270m .gpu/gemma3-270m
#   pip download --no-deps ... -d .whl trl datasets peft ...   # only what the GPU machine lacks
# There, from the repository root, with .gpu (and .whl, if any) beside it:
#   bash benchmarks/gpu.sh [OUTPUT_FOLDER]          # default: $OUT, else benchmarks/results/gpu
# Each benchmark runs under its own time limit (LIMIT seconds, default 200), so that one that fails or
# hangs leaves the others' results; its log and JSON go to the output folder; the exit code is 1 if any failed. ONLY="a d" runs only those
# (parts: tests, the GPU tests of the sampler; a, c, d, the benchmarks; cudnn, (a) and (d) without cuDNN attention).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/gpu}}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
wheels=${WHEELS-.whl}  # WHEELS= (empty) where the packages are installed already
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null | tee "$out/machine.txt"
"$python" -c 'import torch, transformers, trl, peft, datasets, accelerate; print({m.__name__: m.__version__ for m in (torch, transformers, trl, peft, datasets, accelerate)})' | tee -a "$out/machine.txt" || exit 1
model=${MODEL:-/tmp/gemma3-270m-random}
[ -f "$model/model.safetensors" ] || "$python" -m benchmarks.random_checkpoint build .gpu/gemma3-270m "$model" >/dev/null || exit 1

run() {  # NAME MODULE ARGS...: the log in full to the output folder, its end here
  local name=$1; shift
  echo "== $name: $*"
  timeout "${LIMIT:-200}" "$python" -m "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc"; grep -v '%|' "$out/$name.log" | tail -n "${TAIL:-14}"
  [ "$rc" = 0 ] || failed="$failed $name"
}
failed=""
only=" ${ONLY:-tests a c d cudnn} "  # which of the parts below to run
[[ $only == *" tests "* ]] && TAIL=3 run tests pytest -q -p no:cacheprovider tests/test_decoding.py -k gpu
[[ $only == *" a "* ]] && run a benchmarks.generation_backends --model "$model" --prompts "${PROMPTS:-16}" --n 4 --tokens "${TOKENS:-64}" \
  --skip vllm --output "$out/generation_backends.json"
[[ $only == *" c "* ]] && run c benchmarks.dpo_memory --model "$model" --steps "${STEPS:-8}" --count 32 --output "$out/dpo_memory.json"
[[ $only == *" d "* ]] && run d benchmarks.sft_speed --model "$model" --epochs "${EPOCHS:-4}" --only "trl head;+ no activation checkpointing;+ packing" \
  --output "$out/sft_speed.json"
# The same (a) and (d) rows with attention kept off cuDNN (per-shape plans), to compare with the rows above.
[[ $only == *" cudnn "* ]] && run a-no-cudnn benchmarks.generation_backends --model "$model" --prompts "${PROMPTS:-16}" --n 4 \
  --tokens "${TOKENS:-64}" --skip naive,vllm --no-cudnn-attention --output "$out/generation_backends_no_cudnn.json"
[[ $only == *" cudnn "* ]] && run d-no-cudnn benchmarks.sft_speed --model "$model" --epochs "${EPOCHS:-4}" \
  --only "trl head;+ no activation checkpointing" --no-cudnn-attention --output "$out/sft_speed_no_cudnn.json"
[ -z "$failed" ] || { echo "failed:$failed"; exit 1; }

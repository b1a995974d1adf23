#!/usr/bin/env bash
# Every GPU measurement of this round, as ONE device command: each benchmark runs with
# `--device cuda` and its printed table is teed to "$OUT/<name>.txt" (OUT defaults to ./gpu_out).
# A benchmark that fails or runs past its time limit does not stop the others; the summary at
# the end lists each one's exit status (124 = time limit) and the script exits 1 if any failed.
#
# With the device tool (one H200, 16 cores; 15 minutes of device time per session, 10 per command):
#   here, once, in the repo root:  bash ../shared/tools/device_wheels.sh   (open_clip, faiss, ... into .whl/)
#   then run(carry=[".whl"], timeout_s=600, command=
#     "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_all.sh")
#   The tables come back as files under $OUT; paste them into the docs with the date and machine.
#
# Environment:
#   GPU_ALL_DRY_RUN=1     print the commands only (the test uses it)
#   GPU_ALL_ONLY="a b"    run only these names (e.g. a rerun of the ones that timed out)
#   GPU_ALL_TIMEOUT=90    seconds per benchmark (8 x 90 s is over the tool's 600 s per command: run two
#                         calls with GPU_ALL_ONLY, or lower the limit)
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"  # keep /tmp/site (the wheels) behind the worktree
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python3}"
LIMIT="${GPU_ALL_TIMEOUT:-90}"
EMBED="--device cuda --precision bf16 --models ViT-B-32 --batch-size 256 --workers 15 --images 2000 --rounds 3"

BENCHES=(
  "embed_bf16|benchmarks/embed_throughput.py $EMBED"
  "embed_bf16_gpu_decode|benchmarks/embed_throughput.py $EMBED --gpu-decode"
  "ftp_speed|benchmarks/ftp_speed.py --device cuda"
  "fopru_speed|benchmarks/fopru_speed.py --device cuda"
  "dllm_speed|benchmarks/dllm_speed.py --device cuda"
  "dataprune_scale|benchmarks/dataprune_scale.py --device cuda"
  "dllm_serve|benchmarks/dllm_serve.py --device cuda"
  # needs vLLM (a CUDA build) importable on the device: its wheels are not among device_wheels.sh's
  "vllm_fopru|benchmarks/vllm_fopru.py --device cuda"
)

[ -n "$GPU_ALL_DRY_RUN" ] || mkdir -p "$OUT"
summary=()
failed=0
for entry in "${BENCHES[@]}"; do
  name="${entry%%|*}"
  cmd="${entry#*|}"
  if [ -n "$GPU_ALL_ONLY" ] && [[ " $GPU_ALL_ONLY " != *" $name "* ]]; then
    continue
  fi
  if [ -n "$GPU_ALL_DRY_RUN" ]; then
    echo "$name: $PY $cmd | tee $OUT/$name.txt"
    continue
  fi
  echo "=== $name: $PY $cmd (limit ${LIMIT}s)"
  start=$SECONDS
  # shellcheck disable=SC2086  # cmd is a list of words on purpose
  timeout "$LIMIT" "$PY" $cmd 2>&1 | tee "$OUT/$name.txt"
  rc=$?
  summary+=("$name: exit $rc, $((SECONDS - start)) s")
  [ "$rc" -eq 0 ] || failed=1
done

if [ -z "$GPU_ALL_DRY_RUN" ]; then
  echo
  echo "=== summary (tables in $OUT/)"
  printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
fi
exit "$failed"

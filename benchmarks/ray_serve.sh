#!/usr/bin/env bash
# One `inferd serve` against Ray Serve with 1 and 2 replicas (inferd.deploy.ray_serve), built-in
# model, the same `inferd bench serve` workload against each, REPEATS rounds in turn.
# Usage: benchmarks/ray_serve.sh [REPEATS] [OUT_DIR]   (needs `pip install ".[ray]"`)
set -u
REPEATS=${1:-2}
OUT=${2:-/tmp/inferd-ray-bench}
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0
BENCH=(inferd bench serve --num-prompts 96 --input-len 32:128 --output-len 32:128 --max-concurrency 32
       --ignore-eos --token-id-limit 4000 --seed 0 --no-plot --no-progress)
ENGINE="--max-num-seqs 32 --kv-cache-memory 1GiB"

wait_healthy() {  # 300 s at most
  for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done
  echo "no healthy server at $1" >&2; return 1
}

for round in $(seq 1 "$REPEATS"); do
  # shellcheck disable=SC2086
  inferd serve --port 8200 $ENGINE >"$OUT/direct.log" 2>&1 &
  pid=$!
  wait_healthy http://127.0.0.1:8200 && "${BENCH[@]}" --base-url http://127.0.0.1:8200 \
    --output-prefix "$OUT/direct-$round" >"$OUT/direct-$round.txt" 2>&1
  kill "$pid"; wait "$pid"
  for replicas in 1 2; do
    # Ray's proxy listens on 127.0.0.1:8000 by default.
    serve run inferd.deploy.ray_serve:build_app serve_args="$ENGINE" num_replicas="$replicas" num_cpus=1 \
      >"$OUT/ray$replicas.log" 2>&1 &
    pid=$!
    # A few seconds for the replicas to settle after the first healthy answer.
    wait_healthy http://127.0.0.1:8000 && sleep 5 && "${BENCH[@]}" --base-url http://127.0.0.1:8000 \
      --output-prefix "$OUT/ray$replicas-$round" >"$OUT/ray$replicas-$round.txt" 2>&1
    kill -TERM "$pid"; wait "$pid"
    ray stop --force >/dev/null 2>&1
    sleep 2
  done
done
grep -H "Output token throughput" "$OUT"/*.txt

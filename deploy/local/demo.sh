#!/usr/bin/env bash
# The end-to-end demo: local Kafka and InfluxDB, a simulated fleet through the
# pipeline, per-user totals from InfluxDB and the truth check against the
# simulator's ground truth. Run through `make demo`.
set -euo pipefail

work=$(mktemp -d -t quotaflow-demo-XXXXXX)
echo "== starting local Kafka and InfluxDB (the first run installs them)"
eval "$(quotaflow local up --env)"
run_id=$(date +%Y%m%d%H%M%S)
export QUOTAFLOW_TOPIC_PREFIX="demo-$run_id" QUOTAFLOW_INFLUX_BUCKET="demo_$run_id"
export QUOTAFLOW_TIMEZONE="${QUOTAFLOW_TIMEZONE:-Europe/Berlin}" QUOTAFLOW_STATE_DIR="$work/state"

echo "== simulating 20 nodes x 500 users x 3 days"
quotaflow simulate --nodes 20 --users 500 --days 3 --start 2026-10-24T00:00:00+00:00 \
  --out "$work/fleet.jsonl" --truth "$work/truth.jsonl"

echo "== running the pipeline (worker + InfluxDB sink)"
quotaflow run > "$work/run.log" 2>&1 &
pipeline=$!
trap 'kill -TERM $pipeline 2>/dev/null; wait $pipeline 2>/dev/null || true' EXIT

echo "== replaying the fleet into Kafka and waiting until InfluxDB has it all"
quotaflow replay "$work/fleet.jsonl" --wait --timeout 600

echo "== per-user totals, read back from InfluxDB"
quotaflow top --limit 10
quotaflow usage --user user-00007 --period day
quotaflow usage --user user-00042 --period month

echo "== truth check against the simulator's ground truth"
quotaflow check --truth "$work/truth.jsonl"

echo
echo "Kafka and InfluxDB keep running: eval \"\$(.venv/bin/quotaflow local up --env)\" to use"
echo "them, .venv/bin/quotaflow local down to stop them. Files of this run: $work"

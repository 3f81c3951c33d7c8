#!/usr/bin/env bash
# The end-to-end demo: local Kafka and InfluxDB, a simulated fleet through the
# pipeline, per-user totals from InfluxDB and the truth check against the
# simulator's ground truth, then quota plans for a small live fleet and the
# commands they cause, and a report of the dashboards' key views. Run through `make demo`.
set -euo pipefail

work=$(mktemp -d -t quotaflow-demo-XXXXXX)
export COLUMNS="${COLUMNS:-120}"  # tables wider than a pipe's default 80
echo "== starting local Kafka and InfluxDB (the first run installs them)"
eval "$(quotaflow local up --env)"
run_id=$(date +%Y%m%d%H%M%S)
export QUOTAFLOW_TOPIC_PREFIX="demo-$run_id" QUOTAFLOW_INFLUX_BUCKET="demo_$run_id"
export QUOTAFLOW_TIMEZONE="${QUOTAFLOW_TIMEZONE:-Europe/Berlin}" QUOTAFLOW_STATE_DIR="$work/state"

# The simulated history ends now and covers the last 35 days, so the report's 30 days,
# its month and the quota burn of this month all have data.
days=35
echo "== simulating 10 nodes x 200 users x $days days up to now (a report every 4 hours)"
quotaflow simulate --nodes 10 --users 200 --days "$days" --interval 14400 \
  --start "$(date -u -d "-$days days" +%Y-%m-%dT%H:%M:%S+00:00)" \
  --out "$work/fleet.jsonl" --truth "$work/truth.jsonl"

# A calendar-month plan for one simulated user, published before its traffic: its
# allowance is a tenth above what the user moves this month (from the ground truth,
# rounded up to 100 MB), so the month's burn passes the 50 % and 80 % warnings and
# ends near the allowance.
burner=user-00042
quota=$(python - "$work/truth.jsonl" "$burner" <<'PY'
import json
import os
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

month = datetime.now(ZoneInfo(os.environ["QUOTAFLOW_TIMEZONE"])).strftime("%Y-%m")
with open(sys.argv[1]) as truth:
    used = sum(r["up"] + r["down"] for r in map(json.loads, truth)
               if r["user_id"] == sys.argv[2] and r["day"].startswith(month))
print(-(-used * 10 // 9 // 100_000_000) * 100_000_000)
PY
)
quotaflow plans set "$burner" --quota "$quota" --period calendar_month --warn-at 0.5,0.8

echo "== running the pipeline (worker + InfluxDB sink)"
quotaflow run > "$work/run.log" 2>&1 &
pipeline=$!
trap 'kill -TERM $pipeline 2>/dev/null; wait $pipeline 2>/dev/null || true' EXIT

echo "== replaying the fleet into Kafka and waiting until InfluxDB has it all"
quotaflow replay "$work/fleet.jsonl" --wait --timeout 600

echo "== per-user totals, read back from InfluxDB"
quotaflow top --limit 10
quotaflow usage --user user-00007 --period month
quotaflow usage --user "$burner" --period day

echo "== truth check against the simulator's ground truth"
quotaflow check --truth "$work/truth.jsonl"

echo "== quotas: plans for four users of a small live fleet, published before its traffic"
since=$(date -u -d '-1 day' +%Y-%m-%dT%H:%M:%SZ)
cat > "$work/plans.jsonl" <<PLANS
{"user_id": "live-user-00000", "quota_bytes": null, "period": {"kind": "none"}, "starts_at": "$since", "enabled": true}
{"user_id": "live-user-00001", "quota_bytes": 200000000, "period": {"kind": "none"}, "starts_at": "$since", "warn_at": [0.5, 0.8], "enabled": true}
{"user_id": "live-user-00002", "quota_bytes": 150000000, "period": {"kind": "none"}, "starts_at": "$since", "enabled": true}
{"user_id": "live-user-00003", "quota_bytes": 10000000000, "period": {"kind": "calendar_month"}, "enabled": false}
PLANS
quotaflow plans import "$work/plans.jsonl"
quotaflow simulate --nodes 2 --users 4 --days 0.5 --seed 11 --malformed 0 --interval 600 \
  --name-prefix live- --start "$(date -u -d '-13 hours' +%Y-%m-%dT%H:%M:%S+00:00)" \
  --out "$work/live.jsonl"
quotaflow replay "$work/live.jsonl" --wait --timeout 300

echo "== the commands the worker issued (quotaflow control tail)"
# six: user-00042's two warnings during the replay, then the live fleet's four
quotaflow control tail --from-beginning --limit 6 --timeout 30

echo "== live-user-00002 buys a 100 MB pack while disabled, and is let back in"
quotaflow plans set live-user-00002 --add-pack 100MB
quotaflow control tail --from-beginning --limit 7 --timeout 30 | grep -w enable
sleep 3  # the sink writes the quota state within a second or two
quotaflow plans show live-user-00002
quotaflow plans list

echo "== the report: the dashboards' key views as PNGs and one HTML page (quotaflow report)"
quotaflow report --out "$work/report" --user "$burner" --html > /dev/null
echo "Report: $work/report/index.html (open it in a browser; the PNGs are beside it)"

echo
echo "Kafka and InfluxDB keep running: eval \"\$(.venv/bin/quotaflow local up --env)\" to use"
echo "them, .venv/bin/quotaflow local down to stop them. Files of this run: $work"

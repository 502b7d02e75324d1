#!/usr/bin/env bash
# Open an MLflow store in headless Chromium as a user would (after `fedprobe run`) and save two screenshots:
# the experiment's runs table (through the URL fedprobe prints) and one run's page.
#   scripts/screenshot_mlflow.sh sqlite:///$PWD/mlflow.db OUT_DIR [EXPERIMENT_ID [RUN_ID]]
# Defaults: experiment 1, its newest run. Needs Chromium (Debian: apt-get install chromium); nothing leaves the machine.
set -euo pipefail
uri=${1:?usage: screenshot_mlflow.sh TRACKING_URI OUT_DIR [EXPERIMENT_ID [RUN_ID]]}
out=$(realpath -m "${2:?usage: screenshot_mlflow.sh TRACKING_URI OUT_DIR [EXPERIMENT_ID [RUN_ID]]}")
exp=${3:-1}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "screenshot_mlflow: no Chromium found (apt-get install chromium)" >&2; exit 2; }
run=${4:-$(python - "$uri" "$exp" <<'PY'
import sys
from mlflow import MlflowClient
runs = MlflowClient(tracking_uri=sys.argv[1]).search_runs([sys.argv[2]], max_results=1, order_by=["start_time DESC"])
print(runs[0].info.run_id if runs else "")
PY
)}
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$out"
profile=$(mktemp -d)
mlflow ui --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" --workers 1 >"$profile/ui.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$profile"' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "screenshot_mlflow: mlflow ui did not start" >&2; cat "$profile/ui.log" >&2; exit 1; }
shot() {  # URL FILE
  "$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-sync \
    --user-data-dir="$profile/chrome" --hide-scrollbars --window-size=1900,1000 --virtual-time-budget=25000 \
    --screenshot="$2" "$1" >/dev/null 2>&1
  [ -s "$2" ] || { echo "screenshot_mlflow: Chromium wrote no $2" >&2; exit 1; }
  echo "$2"
}
base="http://127.0.0.1:$port/#/experiments/$exp"
shot "$base/runs?workflowType=machine_learning&viewStateShareKey=fedprobe" "$out/mlflow_experiment.png"
[ -z "$run" ] || shot "$base/runs/$run?workflowType=machine_learning" "$out/mlflow_run.png"

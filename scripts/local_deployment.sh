#!/usr/bin/env bash
# A real Flower deployment on one machine: one SuperLink and N SuperNodes as separate processes, then
# fedprobe submitted with `flwr run`. Usage (from the repository root, after `make setup`):
#
#   scripts/local_deployment.sh [N_SUPERNODES] [extra --run-config overrides, ';'-separated]
#   scripts/local_deployment.sh 2 "federation.rounds=2;federation.local_steps=2"
#
# Everything listens on 127.0.0.1 only; all processes are stopped on exit. Logs go to $WORK (printed).
# On several machines: start flower-superlink on one host, flower-supernode --superlink HOST:PORT on each
# other host with its own --node-config "partition-id=I num-partitions=N", and point the [superlink.NAME]
# address in $FLWR_HOME/config.toml at HOST:PORT (Flower 1.42 serves the Fleet, Control and Runtime APIs on one port).
set -euo pipefail
N=${1:-2}
OVERRIDES=${2:-"federation.rounds=2;federation.local_steps=2"}
BASE=${FEDPROBE_PORT_BASE:-19100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${FEDPROBE_BIN:-$ROOT/.venv/bin}
export PATH="$BIN:$PATH" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
WORK=$(mktemp -d -t fedprobe-deploy-XXXX)
export FLWR_HOME="$WORK/flwr"
mkdir -p "$FLWR_HOME"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

flower-superlink --insecure --isolation subprocess --disable-runtime-dependency-installation \
  --database "$WORK/state.db" --host 127.0.0.1 --port $((BASE + 1)) >"$WORK/superlink.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((N - 1))); do
  flower-supernode --insecure --superlink 127.0.0.1:$((BASE + 1)) --isolation subprocess \
    --host 127.0.0.1 --port $((BASE + 10 + i)) --node-config "partition-id=$i num-partitions=$N" \
    >"$WORK/supernode-$i.log" 2>&1 &
  pids+=($!)
done
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deploy"

[superlink.deploy]
address = "127.0.0.1:$((BASE + 1))"
insecure = true
TOML
sleep 5
echo "fedprobe: SuperLink + $N SuperNodes up (logs in $WORK); submitting the run" >&2
cd "$ROOT"
flwr run . deploy --stream --run-config "overrides='$OVERRIDES' tracking-uri='sqlite:///$WORK/mlflow.db'" \
  | tee "$WORK/run.log"
grep -q "fedprobe summary" "$WORK/run.log" || { echo "fedprobe: deployment run did not finish (see $WORK)" >&2; exit 1; }
echo "fedprobe: deployment run finished; MLflow store sqlite:///$WORK/mlflow.db" >&2

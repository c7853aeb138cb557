#!/usr/bin/env bash
# A local stack for trying `mixer submit` on one machine: a Ray head with token authentication and an S3-compatible
# server (moto), both bound to 127.0.0.1, plus an env file that points the `mixer` CLI (and Ray, s3fs, boto3) at them.
#
#   infra/local/start.sh [STATE_DIR]                 # default STATE_DIR: out/local
#   . out/local/env
#   mixer submit jobs/quickstart.yaml --set data.dataset=s3://mixer/datasets/sample --set run.url=s3://mixer/runs/q1 \
#       --follow
#   infra/local/stop.sh [STATE_DIR]
#
# The head gets the S3 endpoint and keys in its environment, as a cloud node gets an instance role: jobs find their
# credentials there, never in what is submitted. A bucket named $S3_BUCKET (default: mixer) is created.
# Settings (environment): RAY_PORT 6379, RAY_DASHBOARD_PORT 8265, RAY_CLIENT_PORT 10001, RAY_AGENT_PORT 52365,
# S3_PORT 9000, S3_BUCKET mixer, NUM_CPUS (default: all), RAY_AUTH_TOKEN (default: a new random token).
#
# Security, for operators: everything listens on 127.0.0.1 only, so only this machine reaches it (`mixer` sends
# the token over plain http only to loopback, unless --insecure). The token never appears on a command line, which
# every user of the machine can read in `ps`: processes get it through their environment (readable by this user
# only), and the env file that holds it for you is created mode 600. Anyone who can act as this user can read it.
set -euo pipefail

STATE_DIR=$(mkdir -p "${1:-out/local}" && cd "${1:-out/local}" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}
S3_PORT=${S3_PORT:-9000}
S3_BUCKET=${S3_BUCKET:-mixer}
NUM_CPUS=${NUM_CPUS:-$(nproc)}

# shellcheck source=infra/local/common.sh
. "$REPO/infra/local/common.sh"
use_repo_venv "$REPO" "$STATE_DIR"

if alive "$STATE_DIR/ray.pid" || alive "$STATE_DIR/moto.pid"; then
  echo "a local stack already runs from $STATE_DIR; stop it first: infra/local/stop.sh $STATE_DIR" >&2
  exit 1
fi

# The bearer token, if any, comes in the environment as WAIT_TOKEN, never as an argument: a process's arguments are
# world-readable (/proc/PID/cmdline, `ps`), its environment only to its own user.
wait_for_url() {  # URL SECONDS PID_FILE LOG; the environment: WAIT_TOKEN (optional)
  python - "$@" <<'PY'
import os, sys, time, urllib.request
url, seconds, pid_file, log = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
token = os.environ.get("WAIT_TOKEN", "")
headers = {"Authorization": f"Bearer {token}"} if token else {}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2)
        sys.exit(0)
    except Exception:
        try:
            os.kill(int(open(pid_file).read()), 0)
        except OSError:
            sys.exit(f"the process of {pid_file} died; see {log}")
        time.sleep(0.5)
sys.exit(f"{url} did not answer within {seconds:.0f} s; see {log}")
PY
}

TOKEN=${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}
ENDPOINT="http://127.0.0.1:$S3_PORT"

# S3-compatible object store.
setsid nohup moto_server -H 127.0.0.1 -p "$S3_PORT" >"$STATE_DIR/moto.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/moto.pid"
wait_for_url "$ENDPOINT/" 60 "$STATE_DIR/moto.pid" "$STATE_DIR/moto.log"

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="$ENDPOINT" FSSPEC_S3_ENDPOINT_URL="$ENDPOINT"
python -c "import boto3, sys; boto3.client('s3').create_bucket(Bucket=sys.argv[1])" "$S3_BUCKET"

# Ray head. --block keeps `ray start` in the foreground as the parent of every Ray process of this head, so that
# stop.sh ends exactly this head (a plain `ray stop` would end every Ray cluster of this user on the machine).
# A short temp dir: Ray's socket paths must stay under the OS limit of 107 characters.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$TOKEN"
ray_node_env
# Keep every address Ray advertises on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

start_head() {
  RAY_TMP=$(mktemp -d /tmp/ray-local-XXXXXX)
  echo "$RAY_TMP" >"$STATE_DIR/ray_tmp"
  setsid nohup ray start --head --block --disable-usage-stats \
    --node-ip-address 127.0.0.1 --port "$RAY_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" --dashboard-agent-listen-port "$RAY_AGENT_PORT" \
    --temp-dir "$RAY_TMP" --num-cpus "$NUM_CPUS" >"$STATE_DIR/ray.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/ray.pid"
}

head_started() {  # until `ray start` says the runtime started; 1 if it ended first
  for _ in $(seq 1800); do
    grep -q "Ray runtime started" "$STATE_DIR/ray.log" 2>/dev/null && return 0
    kill -0 "$(cat "$STATE_DIR/ray.pid")" 2>/dev/null || return 1
    sleep 0.1
  done
  echo "the Ray head did not start within 180 s; see $STATE_DIR/ray.log" >&2
  exit 1
}

start_head
# On a busy machine the raylet can miss the fixed 30 s Ray gives it to register with the GCS; `ray start` then ends
# ("timed out during startup") and takes the head down, though its dashboard may have answered already. Such a head
# is started once more, after its leftovers are ended.
if ! head_started; then
  echo "the Ray head did not start (see $STATE_DIR/ray.failed.log); starting it once more" >&2
  cp "$STATE_DIR/ray.log" "$STATE_DIR/ray.failed.log"
  pkill -KILL -f -- "$RAY_TMP/" 2>/dev/null || true
  rm -rf "$RAY_TMP"
  start_head
  head_started || { echo "the Ray head did not start; see $STATE_DIR/ray.log" >&2; exit 1; }
fi
WAIT_TOKEN="$TOKEN" wait_for_url "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" 180 "$STATE_DIR/ray.pid" \
  "$STATE_DIR/ray.log"

# Mode 600 even if an env file of an earlier stack is still there (cat > keeps an existing file's mode).
umask 077
rm -f "$STATE_DIR/env"
cat >"$STATE_DIR/env" <<ENV
# The local stack started by infra/local/start.sh; source it: . $STATE_DIR/env
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$TOKEN
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export AWS_ENDPOINT_URL=$ENDPOINT
export FSSPEC_S3_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
ENV

echo "local stack up:"
echo "  Ray dashboard / Jobs API  http://127.0.0.1:$RAY_DASHBOARD_PORT   (token auth; GCS 127.0.0.1:$RAY_PORT)"
echo "  S3 endpoint               $ENDPOINT   (bucket s3://$S3_BUCKET)"
echo "  environment               . $STATE_DIR/env"
echo "  stop                      infra/local/stop.sh $STATE_DIR"

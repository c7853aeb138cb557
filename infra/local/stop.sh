#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh [STATE_DIR] (default: out/local): its Ray head and every Ray
# process of that head, and its S3 server. Other Ray clusters on this machine are left alone.
set -uo pipefail

STATE_DIR=${1:-out/local}
if [ ! -d "$STATE_DIR" ]; then
  echo "$STATE_DIR does not exist: nothing to stop" >&2
  exit 1
fi

stop_pid() {  # PID_FILE SECONDS: SIGTERM, then SIGKILL once the grace period is over
  local file=$1 seconds=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq "$((seconds * 10))"); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# `ray start --block` ends its raylet, GCS, dashboard and workers when it gets SIGTERM.
stop_pid "$STATE_DIR/ray.pid" 60
if [ -f "$STATE_DIR/ray_tmp" ]; then
  ray_tmp=$(cat "$STATE_DIR/ray_tmp")
  # Any process still naming this head's temp dir (a worker that outlived its raylet) belongs to this head only.
  for pid in $(pgrep -f -- "$ray_tmp" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$ray_tmp" "$STATE_DIR/ray_tmp"
fi
stop_pid "$STATE_DIR/moto.pid" 10
rm -f "$STATE_DIR/env"
rm -rf "$STATE_DIR/bin"
echo "local stack of $STATE_DIR stopped"

#!/usr/bin/env bash
# Several Ray hosts on one machine, for trying multi-host journeys (prep spread over hosts, a host lost mid-run, a
# replacement joining) without a cloud: a Ray head with no CPUs, and worker hosts each started by `ray start` inside
# `unshare --uts --mount`, with its own host name (host-I), its own /etc/hosts (bind-mounted, so the name resolves),
# its own node IP on the loopback range (127.0.0.(I+1) by default) and its own temp folder. Needs root (or the right
# to unshare namespaces); everything listens on loopback addresses only.
#
#   infra/local/cluster.sh up N [STATE_DIR]          # head + host-1..host-N; STATE_DIR defaults to out/hosts
#   . out/hosts/env                                  # RAY_ADDRESS and the token for `mixer ... --ray-address auto`
#   infra/local/cluster.sh kill-node I [STATE_DIR]   # SIGKILL every process of host-I, as a lost machine would
#   infra/local/cluster.sh add-node I [STATE_DIR]    # start host-I (again), e.g. a replacement
#   infra/local/cluster.sh down [STATE_DIR]          # stop the hosts and the head
#
# The head listens on 127.0.1.1 by default, never on 127.0.0.1: once nodes of other IPs may join
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 on every process of the cluster), Ray reads 127.0.0.1 as "this machine" and
# swaps in its network address, where nothing listens. Token authentication: the token is made once, kept in
# STATE_DIR/token (mode 600) and handed to every process in its environment, never on a command line. Processes
# inherit this script's environment, so the S3 endpoint and keys a job needs (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)
# are set before `up` or `add-node`.
# Settings (environment): RAY_PORT 6390, CPUS_PER_HOST 1, OBJECT_STORE_MB 200,
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S 20, HEAD_IP 127.0.1.1 and HOST_IPS 127.0.0 (host-I on HOST_IPS.(I+1)): a
# second cluster beside the first takes other addresses (e.g. HEAD_IP=127.0.3.1 HOST_IPS=127.0.2), as Ray's
# per-node services listen on fixed ports.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
COMMAND=$1
shift
case $COMMAND in
  up | kill-node | add-node) [ $# -ge 1 ] || usage; ARG=$1; shift ;;
  down) ARG= ;;
  *) usage ;;
esac
STATE_DIR=$(mkdir -p "${1:-out/hosts}" && cd "${1:-out/hosts}" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HEAD_IP=${HEAD_IP:-127.0.1.1}
HOST_IPS=${HOST_IPS:-127.0.0}
RAY_PORT=${RAY_PORT:-6390}
CPUS_PER_HOST=${CPUS_PER_HOST:-1}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-200}
# shellcheck source=infra/local/common.sh
. "$REPO/infra/local/common.sh"
use_repo_venv "$REPO" "$STATE_DIR"
ray_node_env
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=token
# Ray Train restarts a failed run at once, sometimes before the lost host is noticed, and then waits this long for
# workers that cannot start before it tries again with the workers the cluster holds (Ray's default: 60 s).
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=${RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S:-20}

token() {
  if [ ! -f "$STATE_DIR/token" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE_DIR/token")
  fi
  RAY_AUTH_TOKEN=$(cat "$STATE_DIR/token")
  export RAY_AUTH_TOKEN
}

wait_started() {  # NAME SECONDS: until the `ray start` of NAME (head, host-I) says its node runs; 1 if it ended
  local pid
  pid=$(cat "$STATE_DIR/$1.pid")
  for _ in $(seq "$(($2 * 10))"); do
    grep -q "Ray runtime started" "$STATE_DIR/$1.log" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  echo "$1 did not start within $2 s; see $STATE_DIR/$1.log" >&2
  exit 1
}

started() {  # NAME SECONDS: wait_started, or fail naming the log
  wait_started "$1" "$2" || { echo "$1 did not start; see $STATE_DIR/$1.log" >&2; exit 1; }
}

host_started() {  # I: wait for host-I; on a loaded machine a raylet can miss the 30 s Ray gives it to register
  # with the GCS (its `ray start` ends: "timed out during startup"), so a host that ended is started once more.
  wait_started "host-$1" 120 && return 0
  echo "host-$1 did not start (see $STATE_DIR/host-$1.log); starting it once more" >&2
  cp "$STATE_DIR/host-$1.log" "$STATE_DIR/host-$1.failed.log"
  start_host "$1"
  started "host-$1" 120
}

node_tmp() {  # NAME: a fresh, short temp folder for the node (Ray's socket paths must stay under 107 characters)
  local tmp
  tmp=$(mktemp -d /tmp/ray-host-XXXXXX)
  echo "$tmp" >"$STATE_DIR/$1.tmp"
  echo "$tmp"
}

end_leftovers() {  # NAME: SIGKILL any process still naming the node's temp folder (it belongs to that node only)
  [ -f "$STATE_DIR/$1.tmp" ] || return 0
  pkill -KILL -f -- "$(cat "$STATE_DIR/$1.tmp")/" 2>/dev/null || true
  rm -rf "$(cat "$STATE_DIR/$1.tmp")" "$STATE_DIR/$1.tmp"
}

start_host() {  # I
  local i=$1 ip="$HOST_IPS.$(($1 + 1))" tmp
  if alive "$STATE_DIR/host-$i.pid"; then
    echo "host-$i already runs (pid $(cat "$STATE_DIR/host-$i.pid"))" >&2
    exit 1
  fi
  { cat /etc/hosts; echo "$ip host-$i"; } >"$STATE_DIR/hosts-$i"
  end_leftovers "host-$i"
  tmp=$(node_tmp "host-$i")
  # setsid: the host's processes form one process group, which kill-node ends at once.
  setsid unshare --uts --mount bash -c "hostname host-$i && mount --bind '$STATE_DIR/hosts-$i' /etc/hosts && exec ray start \
    --address $HEAD_IP:$RAY_PORT --node-ip-address $ip --num-cpus $CPUS_PER_HOST \
    --object-store-memory $((OBJECT_STORE_MB << 20)) --temp-dir '$tmp' --disable-usage-stats --block" \
    >"$STATE_DIR/host-$i.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/host-$i.pid"
}

signal_group() {  # PID_FILE SIGNAL: the process group the file names
  [ -f "$1" ] && kill "-$2" -- "-$(cat "$1")" 2>/dev/null || true
}

wait_gone() {  # SECONDS PID_FILE...: wait for them to end, then SIGKILL their groups
  local seconds=$1 pid_file
  shift
  for _ in $(seq "$((seconds * 10))"); do
    local running=0
    for pid_file in "$@"; do
      alive "$pid_file" && running=1
    done
    [ "$running" = 0 ] && break
    sleep 0.1
  done
  for pid_file in "$@"; do
    signal_group "$pid_file" KILL
    rm -f "$pid_file"
  done
}

case $COMMAND in
  up)
    if alive "$STATE_DIR/head.pid"; then
      echo "a cluster already runs from $STATE_DIR; stop it first: $0 down $STATE_DIR" >&2
      exit 1
    fi
    token
    end_leftovers head
    head_tmp=$(node_tmp head)
    # A lost host is noticed in about 5 s (Ray's default: about 15 s), which suits trials on one machine.
    RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=5 \
      setsid ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" --num-cpus 0 --include-dashboard false \
      --object-store-memory $((OBJECT_STORE_MB << 20)) --temp-dir "$head_tmp" --disable-usage-stats --block \
      >"$STATE_DIR/head.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/head.pid"
    started head 60
    # One host after the other: hosts registering at once with a GCS on a busy machine is what makes them miss
    # Ray's 30 s.
    for i in $(seq "$ARG"); do
      start_host "$i"
      host_started "$i"
    done
    # Mode 600 even if an env file of an earlier cluster is still there (cat > keeps an existing file's mode).
    umask 077
    rm -f "$STATE_DIR/env"
    cat >"$STATE_DIR/env" <<ENV
# The hosts started by infra/local/cluster.sh; source it: . $STATE_DIR/env
export RAY_ADDRESS=$HEAD_IP:$RAY_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
ENV
    echo "head on $HEAD_IP:$RAY_PORT, hosts host-1..host-$ARG on $HOST_IPS.2..$HOST_IPS.$((ARG + 1)); . $STATE_DIR/env"
    ;;
  kill-node)
    [ -f "$STATE_DIR/host-$ARG.pid" ] || { echo "host-$ARG is not running from $STATE_DIR" >&2; exit 1; }
    signal_group "$STATE_DIR/host-$ARG.pid" KILL
    wait_gone 5 "$STATE_DIR/host-$ARG.pid"
    # Ray starts some of a node's processes in sessions of their own; each names the host's temp folder.
    end_leftovers "host-$ARG"
    echo "host-$ARG killed"
    ;;
  add-node)
    alive "$STATE_DIR/head.pid" || { echo "no head runs from $STATE_DIR: $0 up N first" >&2; exit 1; }
    token
    start_host "$ARG"
    host_started "$ARG"
    echo "host-$ARG joined on $HOST_IPS.$((ARG + 1))"
    ;;
  down)
    shopt -s nullglob
    pid_files=("$STATE_DIR"/host-*.pid "$STATE_DIR/head.pid")
    for pid_file in "${pid_files[@]}"; do
      signal_group "$pid_file" TERM
    done
    wait_gone 5 "${pid_files[@]}"
    for tmp_file in "$STATE_DIR"/*.tmp; do
      end_leftovers "$(basename "$tmp_file" .tmp)"
    done
    rm -f "$STATE_DIR/env"
    rm -rf "$STATE_DIR/bin"
    echo "stopped the cluster of $STATE_DIR"
    ;;
esac

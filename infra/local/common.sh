# Sourced by infra/local/start.sh and cluster.sh: what every Ray process they start needs.

# The repository's virtual environment, when there is one, provides ray, moto_server and the `python` of the jobs.
# Only those three go first on the PATH: the rest of .venv/bin goes last, so that tools found on both (ninja, which
# DeepSpeed's JIT-built ops run) stay the system's, as for every other process, and the shared build cache in
# ~/.cache/torch_extensions is not rebuilt each time a different ninja version looks at it.
use_repo_venv() {  # REPO STATE_DIR
  local repo=$1 state=$2
  [ -x "$repo/.venv/bin/python" ] || return 0
  mkdir -p "$state/bin"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$repo/.venv/bin/python" >"$state/bin/python"
  chmod +x "$state/bin/python"
  ln -sf "$repo/.venv/bin/ray" "$state/bin/ray"
  ln -sf "$repo/.venv/bin/moto_server" "$state/bin/moto_server"
  export PATH="$state/bin:$PATH:$repo/.venv/bin"
}

# Settings of every Ray node started here. On SIGTERM Ray first drains the node for up to 30 s (for Ray Serve
# traffic); a local node has none to wait for. Without a GPU, DeepSpeed runs on its CPU accelerator.
ray_node_env() {
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
}

# Whether the process a pid file names is running.
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

#!/usr/bin/env bash
# The install and start commands of every T3D Ray node: cluster/aws.yaml, cluster/onprem.yaml and the
# container image all call this file, so the commands exist once.
#
#   node.sh install DIST_DIR     venv $T3D_VENV (default ~/t3d/venv, made with $T3D_PYTHON, default
#                                python3): torch first, then DIST_DIR's t3d wheel, both under
#                                DIST_DIR/constraints.txt (`make wheel` writes both); puts the venv's
#                                bin/ on PATH in ~/.bashrc, for the launcher's own `ray stop`
#   node.sh start-head [ARGS]    ray start --head (token auth, dashboard on 127.0.0.1); ARGS go to ray start
#   node.sh start-worker [ARGS]  ray start joining $RAY_HEAD_IP (the launcher sets it)
#
# Token auth (RAY_AUTH_MODE=token): Ray 2.60 takes the token from $RAY_AUTH_TOKEN, else the file
# $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. The launcher configs file-mount it at ~/.ray/auth_token.
#
# Site settings: ~/t3d/node.env, if present, is sourced (every variable exported). Read here: T3D_VENV,
# T3D_PYTHON, T3D_NODE_IP (--node-ip-address; Ray itself replaces a loopback one by the machine's
# address), T3D_RAY_PORT (GCS, default 6379), T3D_DASHBOARD_PORT (default 8265), T3D_RAY_ARGS (more
# `ray start` flags, split on spaces), T3D_START_TRIES (default 3) and T3D_START_PAUSE (seconds
# between tries, default 5). pip's own variables (PIP_INDEX_URL, ...) reach the install.
set -euo pipefail

die() { echo "node.sh: $*" >&2; exit 1; }

if [[ -f ~/t3d/node.env ]]; then
  set -a; source ~/t3d/node.env; set +a
fi
VENV=${T3D_VENV:-$HOME/t3d/venv}
RAY_PORT=${T3D_RAY_PORT:-6379}
export RAY_AUTH_MODE=token
export PATH="$VENV/bin:$PATH"     # job drivers run `python ...` with the raylet's PATH: this venv's

install() {
  local dist=${1:?usage: node.sh install DIST_DIR}
  local cons="$dist/constraints.txt" wheels=("$dist"/t3d-*.whl)
  [[ -f $cons ]] || die "$cons missing (run \`make wheel\` and mount dist/)"
  [[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || die "expected one t3d-*.whl in $dist, found: ${wheels[*]}"
  local py=${T3D_PYTHON:-python3}
  if [[ ! -x $VENV/bin/python ]]; then
    if ! "$py" -c 'import ensurepip' 2>/dev/null && command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv   # Ubuntu's python3 lacks venv
    fi
    "$py" -m venv "$VENV" || die "cannot make a venv at $VENV with $py (Debian/Ubuntu: apt-get install python3-venv)"
  fi
  local want have
  want=$(sed -n 's/^# python \([0-9]*\.[0-9]*\).*/\1/p' "$cons")
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ -z $want || $want == "$have" ]] || echo "node.sh: warning: $cons was locked on python $want, this venv has $have" >&2
  # torch alone first: its version comes from the constraints; a GPU node gets the CUDA build
  "$VENV/bin/pip" install -q -c "$cons" torch
  "$VENV/bin/pip" install -q -c "$cons" "${wheels[0]}"
  local line="export PATH=\"$VENV/bin:\$PATH\"  # t3d node.sh"
  grep -qxF "$line" ~/.bashrc 2>/dev/null || echo "$line" >> ~/.bashrc
  echo "node.sh: t3d $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("t3d"))') in $VENV"
}

need_token() {
  [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]] \
    || die "no Ray token on this node: expected ~/.ray/auth_token (a file mount of the cluster config)"
}

start() {
  need_token
  [[ -x $VENV/bin/ray ]] || die "no ray in $VENV (run: node.sh install DIST_DIR)"
  ray stop                          # this node's Ray, if any: a second `ray up` restarts it
  ulimit -n 65536 2>/dev/null || true   # as Ray's own launcher defaults do
  # Ray 2.60 waits a fixed 30 s for the new raylet to register with the GCS (ray/_private/node.py,
  # not configurable): a node still busy, e.g. compiling the fresh venv's modules on first import,
  # can miss it. Then stop what that start left and try again, up to $T3D_START_TRIES times.
  local tries=${T3D_START_TRIES:-3} i
  for ((i = 1; ; i++)); do
    # shellcheck disable=SC2086  # T3D_RAY_ARGS is a list of flags
    ray start ${T3D_NODE_IP:+--node-ip-address=$T3D_NODE_IP} ${T3D_RAY_ARGS:-} "$@" && return 0
    ((i < tries)) || die "ray start failed $i times (see its messages above)"
    echo "node.sh: ray start failed (attempt $i of $tries); stopping what it started and retrying" >&2
    ray stop --force || true
    sleep "${T3D_START_PAUSE:-5}"
  done
}

cmd=${1:-}; shift || true
case $cmd in
  install) install "$@" ;;
  start-head) start --head --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
                --dashboard-port="${T3D_DASHBOARD_PORT:-8265}" "$@" ;;
  start-worker) start --address="${RAY_HEAD_IP:?RAY_HEAD_IP not set (the launcher sets it on workers)}:$RAY_PORT" "$@" ;;
  *) die "usage: node.sh install DIST_DIR | start-head [RAY_START_ARGS] | start-worker [RAY_START_ARGS]" ;;
esac

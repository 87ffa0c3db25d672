#!/usr/bin/env bash
# CPU per scenario of each of a release server's thread kinds (async workers, SQLite writer,
# readers, checkpointer), from /proc utime/stime before and after a `loadgen --target` run.
#
#   benches/scripts/threads.sh SERVER_BIN PORT MODEL_PORT [USERS (64)] [SECS (8)]
#   env: LOADGEN (default target/release/loadgen of this checkout)
# Prints loadgen's summary, then `<thread name> user … sys … us/scenario`. Needs sqlite3.
set -euo pipefail
BIN=$1; PORT=$2; MPORT=$3; USERS=${4:-64}; SECS=${5:-8}
D=$(mktemp -d); LG=${LOADGEN:-$(dirname "$0")/../../target/release/loadgen}
"$BIN" --port "$PORT" --database-url "sqlite://$D/db.sqlite" --llm-proxy-url "http://127.0.0.1:$MPORT" \
  --internal-api-key bench --auto-agent-switching false --log-level error > "$D/server.log" 2>&1 &
P=$!
trap 'kill $P 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
# Each thread's utime and stime (clock ticks), summed per thread name.
snap() {
  for t in /proc/$P/task/*; do
    n=$(cat "$t/comm"); read -ra s <<<"$(sed 's/.*) //' "$t/stat")"; echo "$n ${s[11]} ${s[12]}"
  done | awk '{u[$1]+=$2; s[$1]+=$3} END {for (k in u) print k, u[k], s[k]}'
}
"$LG" --target "http://127.0.0.1:$PORT" --target-pid $P --model-port "$MPORT" --levels "$USERS" --secs 1 --warmup 0.2 >/dev/null 2>&1
N0=$(sqlite3 "$D/db.sqlite" 'select count(*) from sessions'); snap > "$D/a"
"$LG" --target "http://127.0.0.1:$PORT" --target-pid $P --model-port "$MPORT" --levels "$USERS" --secs "$SECS" --warmup 0 2>&1 | grep -vE '^\s*$' | tail -4
snap > "$D/b"; N1=$(sqlite3 "$D/db.sqlite" 'select count(*) from sessions')
TCK=$(getconf CLK_TCK)
join <(sort "$D/a") <(sort "$D/b") | awk -v n=$((N1-N0)) -v t="$TCK" \
  '{printf "%-22s user %6.0f  sys %6.0f us/scenario\n", $1, ($4-$2)*1e6/t/n, ($5-$3)*1e6/t/n}'
echo "scenarios=$((N1-N0))"

#!/usr/bin/env bash
# Instructions per scenario of a release server under callgrind: counters zeroed once it listens,
# `loadgen --target` against it, counters dumped, the total divided by the sessions it stored.
#
#   benches/scripts/callgrind.sh SERVER_BIN PORT MODEL_PORT OUT_DIR [LOADGEN_BIN]
#   env: USERS (8), SECS (20), DUMP_DELAY (seconds after the run before the dump, 2),
#        EXTRA_ENV ("K=V K=V", e.g. OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318)
# Prints `per_scenario=… M`; OUT_DIR/callgrind.out.*.1 is the profile of the measured window
# (`callgrind_annotate --inclusive=yes --tree=caller` on it). Needs valgrind and sqlite3.
set -euo pipefail
BIN=$1; PORT=$2; MPORT=$3; OUT=$4
LG=${5:-$(dirname "$0")/../../target/release/loadgen}
mkdir -p "$OUT"; rm -rf "$OUT"/callgrind.out.* "$OUT"/db.sqlite*
# shellcheck disable=SC2086
env ${EXTRA_ENV:-} valgrind --tool=callgrind --zero-before=main --dump-instr=no \
  --callgrind-out-file="$OUT/callgrind.out.%p" "$BIN" --port "$PORT" \
  --database-url "sqlite://$OUT/db.sqlite" --llm-proxy-url "http://127.0.0.1:$MPORT" \
  --internal-api-key bench --auto-agent-switching false --log-level error > "$OUT/server.log" 2>&1 &
VPID=$!
trap 'kill $VPID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
callgrind_control -z $VPID >/dev/null
"$LG" --target "http://127.0.0.1:$PORT" --target-pid $VPID --model-port "$MPORT" \
  --levels "${USERS:-8}" --secs "${SECS:-20}" --warmup 0.5 > "$OUT/loadgen.txt" 2>&1 || true
sleep "${DUMP_DELAY:-2}"
callgrind_control -d $VPID >/dev/null
sleep 1
kill $VPID; wait $VPID 2>/dev/null || true
F=$(ls "$OUT"/callgrind.out.*.1 | head -1)
TOTAL=$(grep -m1 '^summary:' "$F" | awk '{print $2}')
N=$(sqlite3 "$OUT/db.sqlite" 'select count(*) from sessions')
echo "file=$F total=$TOTAL sessions=$N per_scenario=$(python3 -c "print(round($TOTAL/$N/1e6,3))") M"

#!/usr/bin/env bash
# Runs the console's tests in a real headless Chromium: builds the server binary, installs
# playwright-core (no browser download: Debian's /usr/bin/chromium is used), runs node's test runner.
# Usage: bash agent-runtime-server/console-tests/run.sh   (needs: apt-get install -y chromium nodejs npm)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  echo "Chromium is missing at $chromium: install it with 'apt-get install -y chromium'" >&2
  exit 1
fi
(cd "$repo" && cargo build -q -p agent-runtime-server)
if [ ! -d "$here/node_modules/playwright-core" ]; then
  (cd "$here" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi
cd "$here"
exec node --test --test-concurrency=1 console.test.mjs

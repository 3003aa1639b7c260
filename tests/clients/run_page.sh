#!/usr/bin/env bash
# End-to-end test of `latent serve`'s web page in headless Chromium (Debian's `chromium`
# package) driven by Node over the DevTools protocol (tests/clients/page_test.mjs), with the
# bundled demo model.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet
work="$(mktemp -d)"
"$target/debug/latent" serve --listen 127.0.0.1:0 2>"$work/serve.log" &
server=$!
chromium --headless=new --no-sandbox --disable-gpu --no-first-run --remote-debugging-port=0 \
    --user-data-dir="$work/profile" about:blank 2>"$work/chromium.log" &
browser=$!
stop() {
    kill -INT "$server" 2>/dev/null || true
    kill "$browser" 2>/dev/null || true
    wait "$server" "$browser" 2>/dev/null || true
    rm -rf "$work"
}
trap stop EXIT
wait_for() { # FILE SED-PATTERN WHAT
    for _ in $(seq 1 1200); do
        found="$(sed -n "$2" "$1" | head -n 1)"
        if [ -n "$found" ]; then
            echo "$found"
            return 0
        fi
        sleep 0.1
    done
    cat "$1" >&2
    echo "$3 did not start" >&2
    return 1
}
address="$(wait_for "$work/serve.log" 's|.*listening on http://\([0-9.]*:[0-9]*\)/.*|\1|p' "latent serve")"
devtools="$(wait_for "$work/chromium.log" 's|.*DevTools listening on ws://[0-9.]*:\([0-9]*\)/.*|\1|p' chromium)"
if ! node --experimental-websocket --no-warnings tests/clients/page_test.mjs "http://$address" "$devtools"; then
    echo "--- server log" >&2
    cat "$work/serve.log" >&2
    exit 1
fi

#!/usr/bin/env bash
# End-to-end test of `latent serve` with the `webuiapi` package from PyPI: makes its own
# virtual environment (target/clients-venv, or $LATENT_CLIENTS_VENV), builds the binary, starts
# the server on a free port with the tiny test models and HTTP Basic authentication, runs
# tests/clients/webuiapi_test.py against it, and stops the server with Ctrl-C (SIGINT).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
venv="${LATENT_CLIENTS_VENV:-$target/clients-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "webuiapi==0.9.17"
cargo build --quiet
log="$(mktemp)"
"$target/debug/latent" serve --listen 127.0.0.1:0 --model tests/fixtures/tiny-sd1 \
    --models-dir tests/fixtures --api-auth tester:secret-pw 2>"$log" &
pid=$!
stop() {
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$log"
}
trap stop EXIT
address=""
for _ in $(seq 1 1200); do
    address="$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\)/.*|\1|p' "$log" | head -n 1)"
    [ -n "$address" ] && break
    if ! kill -0 "$pid" 2>/dev/null; then
        cat "$log" >&2
        echo "latent serve did not start" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$address" ]; then
    cat "$log" >&2
    echo "latent serve did not start within 120 s" >&2
    exit 1
fi
if ! "$venv/bin/python" tests/clients/webuiapi_test.py "${address%:*}" "${address##*:}" \
    tester secret-pw; then
    echo "--- server log" >&2
    cat "$log" >&2
    exit 1
fi

#!/usr/bin/env bash
# `make run`: airlockd with config/dev.toml, and the TURN server its live
# view needs (browser VMs have no network: their streamer's media leaves
# as TURN over TCP through airlockd's egress gateway to this server). The
# TURN REST secret is generated once into build/state/turn.secret (0600);
# coturn reads it from a config file, never from its command line. The
# operator API's token is generated once into build/state/operator.tokens
# (0600). Both processes stop together (Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

state=build/state
mkdir -p "$state" && chmod 700 "$state"
secret="$state/turn.secret"
if [ ! -s "$secret" ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret")
fi
conf="$state/turnserver.conf"
# The operator API's token for TCP (config/dev.toml), made once.
tokens="$state/operator.tokens"
if [ ! -s "$tokens" ]; then
    (umask 077; echo "dev $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$tokens")
fi
echo "run-dev: operator token: the second word of $tokens (export AIRLOCK_TOKEN=\$(cut -d' ' -f2 $tokens))" >&2
(
    umask 077
    cat > "$conf" <<CONF
# Written by scripts/run-dev.sh for development: loopback only.
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port=3478
use-auth-secret
static-auth-secret=$(cat "$secret")
realm=airlock.dev
fingerprint
no-cli
no-tls
no-dtls
# Viewer and relay are both on this machine's loopback.
allow-loopback-peers
simple-log
no-stdout-log
log-file=$PWD/$state/turnserver.log
pidfile=$PWD/$state/turnserver.pid
userdb=$PWD/$state/turndb
CONF
)
turnserver -c "$conf" &
turn=$!
trap 'kill "$turn" 2>/dev/null || true; wait "$turn" 2>/dev/null || true' EXIT
# coturn listens within a second; the live view needs it (viewers fall back
# to JPEG frames without it), the login does not.
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/3478) 2>/dev/null && break
    kill -0 "$turn" 2>/dev/null || break
    sleep 0.1
done
(exec 3<>/dev/tcp/127.0.0.1/3478) 2>/dev/null \
    || echo "run-dev: coturn is not listening on 127.0.0.1:3478 (see $state/turnserver.log); the live view will fall back to JPEG frames" >&2
build/bin/airlockd --config config/dev.toml

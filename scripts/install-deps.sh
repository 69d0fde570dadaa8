#!/usr/bin/env bash
# Installs what Ferry needs on a fresh Debian 12 machine (only what is missing).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have qemu-system-x86_64 || need+=(qemu-system-x86)
# qemu-img (a disk's format and size, the copy a destination receives) and qemu-io (tests).
have qemu-img && have qemu-io || need+=(qemu-utils)
# A disk the tests boot a VM from (--boot disk): a FAT image with syslinux on it.
have syslinux || need+=(syslinux)
have mcopy || need+=(mtools)
have mkfs.vfat || need+=(dosfstools)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && pkg_installed busybox-static || need+=(busybox-static)
have cpio || need+=(cpio)
have gcc || need+=(gcc)
have ip || need+=(iproute2)
have tc || need+=(iproute2)
have ping || need+=(iputils-ping)
have mptcpize || need+=(mptcpize)
# systemd-analyze checks packaging/ferry.service offline (no systemd needs to run).
have systemd-analyze || need+=(systemd)
# libvirt: `ferry migrate --libvirt` loads libvirt0 at run time; the lab runs a libvirtd per host
# (`ferry lab up --libvirt`) and the tests drive it with virsh.
for p in libvirt0 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; do pkg_installed "$p" || need+=("$p"); done
for p in libzstd-dev liblz4-dev liburing-dev libssl-dev; do pkg_installed "$p" || need+=("$p"); done

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing ${need[*]}; run as root (apt-get install)" >&2
        exit 1
    fi
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "install-deps: ok"

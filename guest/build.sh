#!/usr/bin/env bash
# Build Ferry's demo guest: a Debian cloud kernel and a busybox initramfs
# that runs the memory workload (guest/workload.c), with the kernel's virtio
# block and network drivers (modules, loaded by /init) for disks and NICs,
# and an echo server (guest/netecho.c) for the network's continuity probes.
#
#   bash guest/build.sh OUT_DIR
#
# Writes OUT_DIR/vmlinuz, OUT_DIR/initrd.img, OUT_DIR/ferry-workload (the
# static workload binary, also usable on the host) and OUT_DIR/manifest.txt.
# Downloaded kernel packages are kept in OUT_DIR/cache.  When the inputs are
# unchanged since the last build (same sources, busybox, kernel package
# version, compiler) it prints "guest: up to date (OUT_DIR)" and does nothing.
# Installs missing build tools (gcc, libc6-dev, busybox-static, cpio) with
# apt-get.  The kernel package is only downloaded and unpacked, never
# installed.
#
# Environment: FERRY_GUEST_KERNEL_META (default linux-image-cloud-amd64)
#              the Debian metapackage that names the kernel to use.
set -euo pipefail

say() { echo "guest: $*"; }
die() { echo "guest: error: $*" >&2; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: build.sh OUT_DIR"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_WORKLOAD=$HERE/workload.c
SRC_NETECHO=$HERE/netecho.c
SRC_INIT=$HERE/init
SRC_BUILD=$HERE/build.sh
KERNEL_META=${FERRY_GUEST_KERNEL_META:-linux-image-cloud-amd64}
for f in "$SRC_WORKLOAD" "$SRC_NETECHO" "$SRC_INIT" "$SRC_BUILD"; do
    [ -f "$f" ] || die "missing source file $f"
done

mkdir -p "$1" || die "cannot create output directory $1"
OUT=$(cd "$1" && pwd)
CACHE=$OUT/cache
mkdir -p "$CACHE"

# One build at a time per output directory.
exec 9>"$OUT/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9 || die "cannot lock $OUT/.lock"
fi

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        [ "$(id -u)" = 0 ] || die "apt-get update needs root"
        say "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing build tools ($*): install them or run as root"
    say "installing $*"
    if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        apt_update
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
            die "apt-get install $* failed"
    fi
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

# ---------------------------------------------------------------- tools
for t in apt-get apt-cache dpkg-deb dpkg-query sha256sum gzip tar; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found (a Debian system is required)"
done
missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
pkg_installed busybox-static || missing+=(busybox-static)
pkg_installed libc6-dev || missing+=(libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
BUSYBOX=$(dpkg-query -L busybox-static | grep -E '/bin/busybox$' | head -n1 || true)
[ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ] || die "busybox-static is installed but its binary was not found"
BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
GCC_VERSION=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)

# ---------------------------------------------------------------- kernel
resolve_kernel_pkg() {
    apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
KPKG=$(resolve_kernel_pkg || true)
if [ -z "$KPKG" ]; then
    apt_update
    KPKG=$(resolve_kernel_pkg || true)
fi
[ -n "$KPKG" ] || die "cannot find the kernel package behind $KERNEL_META (apt-cache depends found nothing)"
KVER=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')
if [ -z "$KVER" ] || [ "$KVER" = "(none)" ]; then
    apt_update
    KVER=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')
fi
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no installable version of $KPKG"

# ---------------------------------------------------------------- cache check
INPUT_SHA=$(
    {
        echo "workload.c $(sha "$SRC_WORKLOAD")"
        echo "netecho.c $(sha "$SRC_NETECHO")"
        echo "init $(sha "$SRC_INIT")"
        echo "build.sh $(sha "$SRC_BUILD")"
        echo "busybox-static $BUSYBOX_VERSION $(sha "$BUSYBOX")"
        echo "kernel $KPKG $KVER"
        echo "gcc $GCC_VERSION"
    } | sha256sum | cut -d' ' -f1
)
manifest_get() { sed -n "s/^$1=//p" "$OUT/manifest.txt" | head -n1; }
if [ -f "$OUT/manifest.txt" ] && [ "$(manifest_get input_sha256)" = "$INPUT_SHA" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/ferry-workload" ] &&
    [ "$(sha "$OUT/vmlinuz")" = "$(manifest_get vmlinuz_sha256)" ] &&
    [ "$(sha "$OUT/initrd.img")" = "$(manifest_get initrd_sha256)" ] &&
    [ "$(sha "$OUT/ferry-workload")" = "$(manifest_get workload_bin_sha256)" ]; then
    say "up to date ($OUT)"
    exit 0
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ferry-guest.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# Download the .deb (or reuse the cached one) and check it against apt's index.
find_cached_deb() {
    local f
    for f in "$CACHE/${KPKG}"_*.deb; do
        [ -f "$f" ] || continue
        if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$KPKG" ] &&
            [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$KVER" ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}
KDEB_EXPECTED_SHA=$(apt-cache show "$KPKG=$KVER" 2>/dev/null | awk '$1 == "SHA256:" { print $2; exit }')
KDEB=$(find_cached_deb || true)
if [ -n "$KDEB" ] && [ -n "$KDEB_EXPECTED_SHA" ] && [ "$(sha "$KDEB")" != "$KDEB_EXPECTED_SHA" ]; then
    say "cached $(basename "$KDEB") is corrupt, downloading again"
    rm -f "$KDEB"
    KDEB=
fi
if [ -z "$KDEB" ]; then
    say "downloading kernel $KPKG $KVER"
    if ! (cd "$CACHE" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG=$KVER" >/dev/null); then
        apt_update
        (cd "$CACHE" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG=$KVER" >/dev/null) ||
            die "apt-get download $KPKG=$KVER failed"
    fi
    KDEB=$(find_cached_deb || true)
    [ -n "$KDEB" ] || die "downloaded $KPKG $KVER but cannot find the .deb in $CACHE"
    if [ -n "$KDEB_EXPECTED_SHA" ] && [ "$(sha "$KDEB")" != "$KDEB_EXPECTED_SHA" ]; then
        rm -f "$KDEB"
        die "$KPKG $KVER: the downloaded .deb does not match apt's SHA256"
    fi
else
    say "using cached kernel $(basename "$KDEB")"
fi

say "unpacking $(basename "$KDEB")"
mkdir -p "$TMP/kernel"
# boot/ and the virtio modules are all that is needed: a partial `dpkg -x`.
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$TMP/kernel" --wildcards './boot/*' \
    './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/drivers/block/virtio_blk.ko*' \
    './lib/modules/*/kernel/drivers/net/virtio_net.ko*' './lib/modules/*/kernel/drivers/net/net_failover.ko*' \
    './lib/modules/*/kernel/net/core/failover.ko*' ||
    die "cannot unpack $KDEB"
shopt -s nullglob
vmlinuz=("$TMP"/kernel/boot/vmlinuz-*)
kconfig=("$TMP"/kernel/boot/config-*)
shopt -u nullglob
[ ${#vmlinuz[@]} -eq 1 ] || die "$KDEB holds ${#vmlinuz[@]} boot/vmlinuz-* files, expected 1"
KREL=${vmlinuz[0]##*/vmlinuz-}
if [ ${#kconfig[@]} -eq 1 ]; then
    for opt in BLK_DEV_INITRD RD_GZIP DEVTMPFS SERIAL_8250_CONSOLE PROC_FS SYSFS BINFMT_ELF; do
        grep -q "^CONFIG_$opt=y" "${kconfig[0]}" ||
            die "kernel $KREL lacks built-in CONFIG_$opt, which the guest needs"
    done
fi

# The guest's drivers, in load order (each after what it depends on; checked
# against the modules' own dependency lists, so a kernel that changes them
# fails the build here rather than the guest at boot).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net"
MODDIR="$TMP/kernel/lib/modules/$KREL/kernel"
loaded=" "
for m in $MODULES; do
    f=$(find "$MODDIR" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || die "kernel $KREL has no module $m"
    case "$f" in *.ko) ;; *) die "module $f is compressed; the guest's busybox insmod needs plain .ko files" ;; esac
    # The module's .modinfo section holds "depends=a,b" (what modinfo prints).
    for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
        case "$loaded" in *" $dep "*) ;; *) die "module $m needs $dep, which is not loaded before it" ;; esac
    done
    loaded="$loaded$m "
done

# ---------------------------------------------------------------- workload
say "compiling workload"
gcc -static -O2 -Wall -Wextra -s -o "$TMP/ferry-workload" "$SRC_WORKLOAD" ||
    die "compiling $SRC_WORKLOAD failed (gcc -static needs libc6-dev)"
"$TMP/ferry-workload" --cmdline "ferry.mem=1" --corrupt-test >/dev/null ||
    die "the freshly built workload fails its own --corrupt-test"
gcc -static -O2 -Wall -Wextra -s -o "$TMP/ferry-netecho" "$SRC_NETECHO" ||
    die "compiling $SRC_NETECHO failed"

# ---------------------------------------------------------------- initramfs
say "packing initramfs (busybox $BUSYBOX_VERSION)"
ROOT=$TMP/root
mkdir -p "$ROOT/bin" "$ROOT/dev" "$ROOT/proc" "$ROOT/sys" "$ROOT/tmp"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 755 "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    case "$applet" in busybox | */*) continue ;; esac
    ln -sf busybox "$ROOT/bin/$applet"
done
install -m 755 "$SRC_INIT" "$ROOT/init"
install -m 755 "$TMP/ferry-workload" "$ROOT/bin/ferry-workload"
install -m 755 "$TMP/ferry-netecho" "$ROOT/bin/ferry-netecho"
mkdir -p "$ROOT/lib/modules"
for m in $MODULES; do
    install -m 644 "$(find "$MODDIR" -name "$m.ko" | head -n1)" "$ROOT/lib/modules/$m.ko"
done
echo "$MODULES" >"$ROOT/lib/modules/load-order"
# The kernel opens /dev/console for /init before devtmpfs is mounted.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
else
    say "warning: not root, initramfs has no /dev/console node (init mounts devtmpfs)"
fi
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$TMP/initrd.img" ||
    die "packing the initramfs failed"

# ---------------------------------------------------------------- outputs
cp "${vmlinuz[0]}" "$TMP/vmlinuz"
{
    echo "# Ferry demo guest, built by guest/build.sh"
    echo "input_sha256=$INPUT_SHA"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel_meta=$KERNEL_META"
    echo "kernel_package=$KPKG"
    echo "kernel_version=$KVER"
    echo "kernel_release=$KREL"
    echo "kernel_deb=$(basename "$KDEB")"
    echo "kernel_deb_sha256=$(sha "$KDEB")"
    echo "vmlinuz_sha256=$(sha "$TMP/vmlinuz")"
    echo "initrd_sha256=$(sha "$TMP/initrd.img")"
    echo "workload_bin_sha256=$(sha "$TMP/ferry-workload")"
    echo "workload_c_sha256=$(sha "$SRC_WORKLOAD")"
    echo "netecho_c_sha256=$(sha "$SRC_NETECHO")"
    echo "init_sha256=$(sha "$SRC_INIT")"
    echo "build_sh_sha256=$(sha "$SRC_BUILD")"
    echo "busybox_version=$BUSYBOX_VERSION"
    echo "busybox_sha256=$(sha "$BUSYBOX")"
    echo "gcc_version=$GCC_VERSION"
} >"$TMP/manifest.txt"

# Replace the outputs; the manifest goes last, so an interrupted build is
# never taken as up to date.
rm -f "$OUT/manifest.txt"
for f in vmlinuz initrd.img ferry-workload; do
    cp "$TMP/$f" "$OUT/.$f.new"
    mv -f "$OUT/.$f.new" "$OUT/$f"
done
cp "$TMP/manifest.txt" "$OUT/.manifest.txt.new"
mv -f "$OUT/.manifest.txt.new" "$OUT/manifest.txt"

say "done ($OUT): vmlinuz $KREL $(du -h "$OUT/vmlinuz" | cut -f1), initrd.img $(du -h "$OUT/initrd.img" | cut -f1)"

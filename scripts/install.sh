#!/usr/bin/env bash
# Installs Ferry on this host: the binary, the systemd unit, an example configuration.
#
#   scripts/install.sh                  build a release binary and install it
#   scripts/install.sh path/to/ferry    install that binary
#   DESTDIR=/tmp/root scripts/install.sh ...   install under another root (packaging, tests)
#
# Puts /usr/local/bin/ferry, /etc/systemd/system/ferry.service, /etc/ferry/ferry.conf
# (the commented example, only if there is none: an operator's file is never replaced),
# /usr/local/share/doc/ferry/, and /var/lib/ferry. Runs `systemctl daemon-reload` when
# systemd runs this host and DESTDIR is empty. It does not enable or start the unit:
#   systemctl enable --now ferry
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${DESTDIR:-}"
binary="${1:-}"

if [[ -z "$binary" ]]; then
    echo "install: building ferry (release)" >&2
    (cd "$repo" && swift build -c release --product ferry >&2)
    binary="$(cd "$repo" && swift build -c release --show-bin-path)/ferry"
fi
[[ -x "$binary" ]] || { echo "install: $binary is not an executable" >&2; exit 1; }

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/local/share/doc/ferry"
install -d -m 0755 "$root/etc/ferry"
install -d -m 0700 "$root/var/lib/ferry"
install -m 0755 "$binary" "$root/usr/local/bin/ferry"
install -m 0644 "$repo/packaging/ferry.service" "$root/etc/systemd/system/ferry.service"
install -m 0644 "$repo/packaging/ferry.conf.example" "$root/usr/local/share/doc/ferry/ferry.conf.example"
install -m 0644 "$repo/docs/ARCHITECTURE.md" "$root/usr/local/share/doc/ferry/ARCHITECTURE.md"
if [[ -e "$root/etc/ferry/ferry.conf" ]]; then
    echo "install: keeping $root/etc/ferry/ferry.conf (the example is in $root/usr/local/share/doc/ferry/)" >&2
else
    install -m 0644 "$repo/packaging/ferry.conf.example" "$root/etc/ferry/ferry.conf"
fi

if [[ -z "$root" && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "install: done; start it with: systemctl enable --now ferry" >&2
else
    echo "install: done (systemd is not running here${root:+, or DESTDIR is set}: no daemon-reload)" >&2
fi

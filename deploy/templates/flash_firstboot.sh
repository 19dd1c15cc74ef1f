#!/bin/bash
# edgesplit first boot, written onto the boot partition by `edgesplit flash`.
#
#   firstboot.sh --stage [--start]   copy this script and its systemd unit into the root
#                                    file system and enable the unit (run by firstrun.sh
#                                    or cloud-init; --start also starts it now)
#   firstboot.sh                     (the unit) unpack the device package and run its
#                                    install.sh; on success delete the package from the
#                                    boot partition (it holds the broker credentials)
#
# Everything is logged to <boot>/edgesplit/install.log, readable in any card reader.
set -u

# (the two EDGESPLIT_* variables exist for the tests; a Pi never sets them)
BOOT=""
for b in ${EDGESPLIT_BOOT_DIRS:-/boot/firmware /boot}; do
    if [ -d "$b/edgesplit" ]; then BOOT="$b"; break; fi
done
if [ -z "$BOOT" ]; then
    echo "edgesplit firstboot: no edgesplit/ directory on the boot partition" >&2
    exit 1
fi
SRC="$BOOT/edgesplit"
LOG="$SRC/install.log"
STATE=${EDGESPLIT_STATE:-/var/lib/edgesplit}
DONE="$STATE/firstboot.done"
UNIT=edgesplit-firstboot.service

exec > >(tee -a "$LOG") 2>&1
echo "== edgesplit firstboot $* ($(date -Is 2>/dev/null || date))"

if [ "${1:-}" = "--stage" ]; then
    install -D -m 755 "$SRC/firstboot.sh" /usr/local/lib/edgesplit/firstboot.sh || exit 1
    install -D -m 644 "$SRC/$UNIT" "/etc/systemd/system/$UNIT" || exit 1
    systemctl daemon-reload 2>/dev/null
    if [ "${2:-}" = "--start" ]; then
        systemctl enable --now --no-block "$UNIT"
    else
        systemctl enable "$UNIT"
    fi
    echo "staged $UNIT"
    exit 0
fi

if [ -e "$DONE" ]; then
    echo "already installed ($DONE exists)"
    exit 0
fi

PKG="$SRC/device-package.tar.gz"
if [ ! -f "$PKG" ]; then
    echo "no device package at $PKG"
    exit 1
fi
if ! (cd "$SRC" && sha256sum -c device-package.sha256); then
    echo "the device package on the boot partition is damaged: flash the card again"
    exit 1
fi

WORK="$STATE/package"
rm -rf "$WORK"
mkdir -p "$WORK"
chmod 700 "$STATE" "$WORK"
if ! tar -xzf "$PKG" -C "$WORK" --no-same-owner; then
    echo "could not unpack $PKG"
    exit 1
fi
INSTALL=$(find "$WORK" -mindepth 1 -maxdepth 2 -name install.sh -type f | sort | head -n 1)
if [ -z "$INSTALL" ]; then
    echo "the device package has no install.sh"
    exit 1
fi

echo "running $INSTALL"
cd "$(dirname "$INSTALL")" || exit 1
EDGESPLIT_FIRSTBOOT=1 bash "$INSTALL"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "install.sh failed with exit code $rc; retrying later (see above)"
    exit "$rc"
fi

touch "$DONE"
# the package carries the device's broker password: do not leave it on FAT
rm -f "$PKG" "$SRC/device-package.sha256"
systemctl disable "$UNIT" 2>/dev/null
echo "edgesplit device package installed"
exit 0

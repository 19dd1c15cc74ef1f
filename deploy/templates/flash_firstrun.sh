#!/bin/bash
# edgesplit-firstrun: written by `edgesplit flash`. Raspberry Pi OS runs it once on
# first boot (systemd.run= in cmdline.txt), before the network is up: it sets the
# host name, Wi-Fi and SSH, stages the edgesplit first-boot unit, removes itself
# from cmdline.txt and reboots. The unit installs the device package on the next boot.
set +e

BOOT=/boot/firmware
[ -f "$BOOT/cmdline.txt" ] || BOOT=/boot
IMAGER=/usr/lib/raspberrypi-sys-mods/imager_custom
mkdir -p "$BOOT/edgesplit"
exec >>"$BOOT/edgesplit/firstrun.log" 2>&1
echo "== edgesplit firstrun ($(date -Is 2>/dev/null || date))"

#@EDGESPLIT_SETTINGS@

bash "$BOOT/edgesplit/firstboot.sh" --stage

# Clean-up: keep these lines last (Bookworm's initramfs rewrites the end of this
# file and the /boot/ path in cmdline.txt when the boot partition is /boot/firmware).
sed -i 's| systemd\.run[^ ]*||g; s| systemd\.unit=kernel-command-line\.target||g' "$BOOT/cmdline.txt"
rm -f "$BOOT/firstrun.sh"
exit 0

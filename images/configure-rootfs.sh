#!/bin/sh
# images/configure-rootfs.sh ROOT: the appliance settings of the image's root filesystem
# (run by build.sh as an mmdebstrap customize hook, after edgellm is installed).
set -eu
root="$1"

# Boot: root by label (the card may be any size); consoles on the Pi's serial port and the
# screen, the screen last so that it shows the boot (and the first boot's note);
# CMA=0 leaves the kernel's default (the Pi 4's), which the hook picks only on a real Pi.
cat > "$root/etc/default/raspi-firmware" <<'EOT'
ROOTPART="LABEL=EDGELLM-ROOT"
CONSOLES="ttyS1,115200 tty0"
CMA=0
EOT
# The initramfs, once (build.sh kept it from being rebuilt after every package); its
# raspi-firmware hook copies kernel, initrd, device trees and firmware to /boot/firmware.
if [ -e "$root/usr/sbin/update-initramfs.distrib" ]; then
    rm "$root/usr/sbin/update-initramfs"
    chroot "$root" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
fi
chroot "$root" update-initramfs -c -k all

cat > "$root/etc/fstab" <<'EOT'
LABEL=EDGELLM-ROOT  /               ext4  defaults,noatime,errors=remount-ro,commit=30  0 1
LABEL=EDGELLMBOOT   /boot/firmware  vfat  defaults,noatime,fmask=0077,dmask=0077,flush  0 2
EOT
echo edgellm > "$root/etc/hostname"  # edgellm-firstboot makes it edgellm-XXXX
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tedgellm\n' > "$root/etc/hosts"
# /etc/machine-id: mmdebstrap leaves it empty, so systemd writes a new one on each card's
# first boot (empty rather than "uninitialized": no first-boot wizard, no presets applied).
rm -f "$root/var/lib/dbus/machine-id"

# Network: DHCP on any wired interface; edgellm answers mDNS itself (zeroconf), so
# systemd-resolved only resolves .local names, never responds on 5353.
mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/resolved.conf.d" "$root/etc/systemd/journald.conf.d"
cat > "$root/etc/systemd/network/50-wired.network" <<'EOT'
[Match]
Name=eth* en*

[Network]
DHCP=yes
IPv6AcceptRA=yes
EOT
printf '[Resolve]\nMulticastDNS=resolve\n' > "$root/etc/systemd/resolved.conf.d/edgellm.conf"
# The journal on the card, small: an SD card wears, and the operator needs the last boots only.
printf '[Journal]\nStorage=persistent\nSystemMaxUse=64M\n' > "$root/etc/systemd/journald.conf.d/edgellm.conf"
mkdir -p "$root/var/log/journal"
systemctl --root="$root" enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    >/dev/null 2>&1
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

cat > "$root/etc/apt/sources.list" <<'EOT'
deb http://deb.debian.org/debian bookworm main non-free-firmware
deb http://deb.debian.org/debian-security bookworm-security main non-free-firmware
EOT
# No password logins: the console shows the address, the boot partition holds the keys.
chroot "$root" passwd -l root >/dev/null

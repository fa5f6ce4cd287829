#!/bin/bash
# images/test-boot.sh [IMAGE.img.xz]: boot the SD-card image under qemu-system-aarch64 -M virt
# with the image's own Debian generic arm64 kernel and initrd, as a card twice its size with
# a USB stick holding a signed bundle of a tiny model plugged in, and check what an operator
# would see:
#   first boot: edgellm-firstboot shows the API key on the console, systemd reports the
#   service started (Type=notify: after its READY=1), /health answers through a forwarded
#   loopback port, the USB import installs the model, a chat completion with the key works
#   and one without it is refused; after power-off the boot partition holds the key file and
#   the root partition fills the card.
#   second boot: no first boot again (same key), the imported model still served.
# The stick also holds a signed software update (a build of this tree one version up, made
# from the image's own aarch64 wheels): the first boot applies it, and the second boot serves
# from the new version. Then a second stick, with a deliberately broken update (a version
# whose service cannot start), is plugged in: the box installs it, sees it fail and rolls back
# by itself, still serving the first update's version.
# The guest's network is qemu's user-mode one with restrict=on: nothing leaves the machine;
# only the forwarded port on 127.0.0.1 reaches in.
#
# images/test-boot.sh --check-devices: start that VM's machine and devices paused (-S, no
# kernel) and quit: seconds, for make test, where a missing ROM or device would only show
# after a 25-minute image build otherwise.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
image="${1:-$(ls "$repo"/dist/image/edgellm-*-rpi4-arm64.img.xz 2>/dev/null | tail -1)}"
python="${PYTHON:-$repo/.venv/bin/python}"
boot_timeout="${BOOT_TIMEOUT:-1200}"
started=$(date +%s)
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "test-boot: $* ($(( $(date +%s) - started )) s)"; }
die() { echo "test-boot: FAILED: $*" >&2; [ -z "${console:-}" ] || tail -40 "$console" >&2; exit 1; }
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# vm CARD STICK PORT [QEMU OPTION...]: the machine, the card, the LAN and the USB stick. The NIC
# gets no option ROM (romfile=): that is iPXE for firmware network boot, and -kernel runs no
# firmware, so the VM needs nothing from the ipxe-qemu package.
vm() {
    local card="$1" stick="$2" port="$3"; shift 3
    qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 2048 -accel tcg,thread=multi \
        -drive "file=$card,format=raw,if=virtio" \
        -netdev "user,id=lan,restrict=on,hostfwd=tcp:127.0.0.1:$port-:8080" -device virtio-net-pci,netdev=lan,romfile= \
        -device qemu-xhci,id=usb -drive "if=none,id=stick,format=raw,file=$stick" \
        -device usb-storage,bus=usb.0,drive=stick -display none "$@"
}

work="$(mktemp -d /var/tmp/edgellm-boot.XXXXXX)"
qemu_pid=""
cleanup() { [ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

if [ "${1:-}" = --check-devices ]; then
    truncate -s 1M "$work/card.img" "$work/stick.img"
    echo quit | vm "$work/card.img" "$work/stick.img" "$(free_port)" -S -monitor stdio -serial none >/dev/null
    echo "test-boot: the VM's machine and devices start"
    exit 0
fi
[ -f "$image" ] || die "no image (make image first)"

# The card: a copy of the image, 1 GiB bigger than it.
say "unpacking $(basename "$image")"
xz -dc "$image" > "$work/card.img"
truncate -s +1G "$work/card.img"
part() { sfdisk -J "$work/card.img" | "$python" -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][$1]; print(p['$2'])"; }
boot_at="$work/card.img@@$(( $(part 0 start) * 512 ))"
mcopy -n -i "$boot_at" "::$(mdir -b -i "$boot_at" :: | grep -o 'vmlinuz-[^ ]*' | head -1)" "$work/vmlinuz"
mcopy -n -i "$boot_at" "::$(mdir -b -i "$boot_at" :: | grep -o 'initrd.img-[^ ]*' | head -1)" "$work/initrd.img"
# The image's own command line, on qemu's serial port; the journal goes to the console too:
# the getty there mutes systemd's status lines, and a failure must be readable in this log.
cmdline="$(mtype -i "$boot_at" ::cmdline.txt | tr -d '\r' | sed 's/console=[^ ]*//g') console=ttyAMA0 systemd.journald.forward_to_console=1"

# What the operator pre-seeds on the boot partition: the site's bundle-signing key, and the
# key software updates are signed with (its own usage: NAME.update.pub).
"$python" -m edgellm keygen -o "$work/site" >/dev/null
"$python" -m edgellm keygen -o "$work/vendor" >/dev/null
mmd -i "$boot_at" ::edgellm ::edgellm/trusted-keys
mcopy -i "$boot_at" "$work/site.pub" ::edgellm/trusted-keys/site.pub
mcopy -i "$boot_at" "$work/vendor.pub" ::edgellm/trusted-keys/vendor.update.pub

# The updates: this tree as the next version, and as the one after it broken, each with the
# image's aarch64 wheels (images/build.sh keeps them beside the image).
wheels="$(dirname "$image")/wheels"
[ -d "$wheels" ] || die "no $wheels beside the image (make image keeps them)"
version="$("$python" -c 'import edgellm; print(edgellm.__version__)')"
bump() { "$python" -c 'import sys; v = sys.argv[1].split("."); print(".".join([*v[:2], str(int(v[2]) + int(sys.argv[2]))]))' "$1" "$2"; }
next="$(bump "$version" 1)"
broken="$(bump "$version" 2)"
for v in "$next" "$broken"; do
    mkdir -p "$work/wheels-$v"
    find "$wheels" -name '*.whl' ! -name 'edgellm-*' -exec cp {} "$work/wheels-$v/" \;
    PYTHONPATH="$repo/tests" "$python" -c "
import sys
from pathlib import Path
from builds import edgellm_wheel
edgellm_wheel(sys.argv[1], Path(sys.argv[2]), broken=sys.argv[1] == sys.argv[3])" "$v" "$work/wheels-$v" "$broken"
    "$python" -m edgellm update create "$work/wheels-$v" -o "$work/update-$v" --key "$work/vendor.key" \
        --min-from "$version" >/dev/null
done
say "made the updates: $next, and $broken (broken)"

# The USB stick: a FAT filesystem with a signed bundle of a tiny scripted chat model.
PYTHONPATH="$repo/tests" "$python" -c "
from pathlib import Path
from conftest import SCRIPT
from tiny_models import CHATML, write_model
write_model(Path('$work/tiny.gguf'), script=SCRIPT, chat_template=CHATML)"
"$python" -m edgellm bundle create "$work/tiny.gguf" -o "$work/stick/tiny" --key "$work/site.key" >/dev/null
mkfs.vfat -n MODELS -C "$work/stick.img" 262144 >/dev/null
mcopy -s -i "$work/stick.img" "$work/stick/tiny" ::/
mcopy -s -i "$work/stick.img" "$work/update-$next" ::/
mkfs.vfat -n BROKEN -C "$work/stick2.img" 262144 >/dev/null
mcopy -s -i "$work/stick2.img" "$work/update-$broken" ::/

port="$(free_port)"
boot() {  # boot N: start the VM, console in $work/console-N.log
    console="$work/console-$1.log"
    vm "$work/card.img" "$work/stick.img" "$port" -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
        -append "$cmdline" -serial "file:$console" -monitor "unix:$work/monitor.sock,server,nowait" &
    qemu_pid=$!
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local deadline=$(( $(date +%s) + $1 )) what="$2"; shift 2
    until "$@" >/dev/null 2>&1; do
        kill -0 "$qemu_pid" 2>/dev/null || die "the VM stopped while waiting for $what"
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
        sleep 2
    done
}
monitor() { "$python" -c "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('$work/monitor.sock')
s.sendall(sys.argv[1].encode() + b'\n')" "$1"; }
power_off() {  # the power button (systemd-logind shuts down cleanly), pressed again every 20 s:
    # a press while logind is still setting up its input devices is lost, as on a real box
    local deadline=$(( $(date +%s) + 300 )) pressed=0
    while kill -0 "$qemu_pid" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] || die "the VM did not power off within 300 s of the power button"
        if [ "$(date +%s)" -ge $(( pressed + 20 )) ]; then monitor system_powerdown || true; pressed=$(date +%s); fi
        sleep 2
    done
    wait "$qemu_pid" || true
    qemu_pid=""
}
api() { PYTHONPATH="$repo/tests" "$python" "$here/check_api.py" "https://127.0.0.1:$port" "$fingerprint" "$@"; }

say "first boot"
boot 1
wait_for "$boot_timeout" "edgellm.service to report READY" grep -aq "systemd\[1\]: Started edgellm.service" "$console"
ready=$(( $(date +%s) - started ))
say "edgellm.service READY"
key="$(grep -aoE 'sk-edgellm-[A-Za-z0-9_-]{32}' "$console" | head -1)"
[ -n "$key" ] || die "no API key on the console"
fingerprint="$(grep -aoE 'sha256//[A-Za-z0-9+/]{43}=' "$console" | head -1)"
[ -n "$fingerprint" ] || die "no TLS fingerprint on the console"
say "the console shows the key and the TLS fingerprint $fingerprint"
grep -aq "edgellm-firstboot.*Finished\|Finished.*edgellm-firstboot" "$console" || die "first boot did not finish"
api health || die "/health"
wait_for 600 "the USB import of the tiny model" api has-model "$key" tiny
say "the USB stick's bundle is imported"
wait_for 1800 "the USB update to $next" api update "$key" "$next" updated
say "the stick's update is applied: $next serves"
api chat "$key" tiny || die "chat completion"
say "chat completion answered"
power_off
mtype -i "$boot_at" ::EDGELLM-API-KEY.txt | grep -q -- "$key" || die "no key file on the boot partition"
mtype -i "$boot_at" ::EDGELLM-API-KEY.txt | grep -qF -- "$fingerprint" || die "no fingerprint in the key file"
[ "$(( $(part 1 start) + $(part 1 size) ))" = "$(( $(stat -c %s "$work/card.img") / 512 ))" ] \
    || die "the root partition was not grown to the end of the card"
say "powered off: key file on the boot partition, root partition grown"

say "second boot"
boot 2
wait_for "$boot_timeout" "edgellm.service to report READY" grep -aq "systemd\[1\]: Started edgellm.service" "$console"
! grep -aq "edgellm on this card" "$console" || die "first boot ran again"
api update "$key" "$next" updated || die "the second boot does not serve $next"
api chat "$key" tiny || die "chat completion after a reboot"
say "second boot: same key, $next serving the model still, no first boot"
monitor "drive_add 0 if=none,id=stick2,format=raw,file=$work/stick2.img"
monitor "device_add usb-storage,bus=usb.0,drive=stick2,id=stick2"
wait_for 1800 "the broken update $broken to be rolled back" api update "$key" "$next" rolled-back
grep -aq "rolled back to $next" "$console" || die "the rollback is not in the journal"
api chat "$key" tiny || die "chat completion after the rollback"
say "the broken update was rolled back: $next serves"
power_off
echo "test-boot: PASSED in $(( $(date +%s) - started )) s (first boot to READY: $ready s)"

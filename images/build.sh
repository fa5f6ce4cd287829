#!/bin/bash
# images/build.sh [OUT_DIR]: the Raspberry Pi 4 (arm64) SD-card image, from Debian 12 packages only.
#
#   mmdebstrap (arm64 under qemu-user through binfmt_misc) -> root filesystem with Debian's
#   linux-image-arm64 and raspi-firmware; edgellm installed offline into /opt/edgellm from
#   wheels (the cross-build's aarch64 llama-cpp-python wheel and PyPI's aarch64 wheels of the
#   rest, fetched first); units installed and enabled by systemd/install.sh --image; then the
#   partitions are made as files (mkfs.vfat + mtools, mkfs.ext4 -d) and put together with
#   sfdisk and dd: no loop devices, no mounts.
#
# Output in OUT_DIR (default dist/image): edgellm-VERSION-rpi4-arm64.img.xz, its .sha256 and
# a .bmap for bmaptool. Needs root (mmdebstrap's root mode), network access to
# deb.debian.org and PyPI, and dist/ holding the armv8.0 wheel (make wheels-aarch64).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/dist/image}"
python="${PYTHON:-$repo/.venv/bin/python}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
boot_mib=256
version="$("$python" -c 'import edgellm; print(edgellm.__version__)')"
name="edgellm-$version-rpi4-arm64"
wheel="$repo/dist/llama_cpp_python-0.3.36+armv8.0-py3-none-linux_aarch64.whl"
started=$(date +%s)

say() { echo "image: $* ($(( $(date +%s) - started )) s)"; }
die() { echo "image: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, file ownership in the image)"
[ -f "$wheel" ] || die "no $wheel: run make wheels-aarch64 first"
for tool in mmdebstrap mkfs.vfat mcopy mkfs.ext4 sfdisk xz bmaptool; do
    command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null \
        || die "missing $tool (make image-tools installs it)"
done
export PATH="$PATH:/usr/sbin:/sbin"

# qemu-user for arm64 maintainer scripts: register it with binfmt_misc (mounting that if needed).
if [ "$(uname -m)" != aarch64 ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf \
        > /proc/sys/fs/binfmt_misc/register
fi

work="$(mktemp -d /var/tmp/edgellm-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/wheels" "$work/boot"

# 1. Wheels for arm64 CPython 3.11 (Debian 12's), at the versions the tests ran with.
say "fetching aarch64 wheels"
"$python" -m pip wheel -q --no-deps -w "$work/wheels" "$repo"
"$python" -m pip freeze --exclude-editable | grep -v '^llama.cpp.python' > "$work/constraints.txt"
platforms=""
for v in 17 24 27 28 31 34 35 36; do platforms="$platforms --platform manylinux_2_${v}_aarch64"; done
# shellcheck disable=SC2086
"$python" -m pip download -q --only-binary=:all: $platforms --platform manylinux2014_aarch64 \
    --platform linux_aarch64 --python-version 3.11 --implementation cp -c "$work/constraints.txt" \
    -d "$work/wheels" "$work"/wheels/edgellm-*.whl "$wheel" 2>&1 | grep -v "is ignored" || true
ls "$work"/wheels/uvloop-* >/dev/null || die "pip download failed"
# Kept beside the image: the wheels an update bundle for this board is made from (README,
# "Updating the box"; images/test-boot.sh makes its updates from them).
rm -rf "$out/wheels" && cp -r "$work/wheels" "$out/wheels"

# 2. The root filesystem.
say "mmdebstrap $suite arm64"
packages=(
    systemd-sysv udev kmod dbus systemd-resolved systemd-timesyncd
    linux-image-arm64 raspi-firmware dosfstools e2fsprogs fdisk
    python3 python3-venv libgomp1 ca-certificates iproute2 netbase
)
# Every package that touches the kernel or udev would rebuild the initramfs (6 minutes each under
# qemu-user): update-initramfs is a no-op until configure-rootfs.sh runs it once, at the end.
mmdebstrap --mode=root --arch=arm64 --variant=minbase --components="main non-free-firmware" \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs' \
    --essential-hook='printf "#!/bin/sh\nexit 0\n" > "$1/usr/sbin/update-initramfs"; chmod 755 "$1/usr/sbin/update-initramfs"' \
    --customize-hook="cp -r '$work/wheels' \"\$1/tmp/wheels\"" \
    --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin python3 -m venv /opt/edgellm/versions/$version" \
    --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin /opt/edgellm/versions/$version/bin/pip install -q --no-index --find-links /tmp/wheels edgellm 'llama_cpp_python==0.3.36+armv8.0'" \
    --customize-hook='rm -rf "$1/tmp/wheels"' \
    --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin /opt/edgellm/versions/$version/bin/python -c 'import llama_cpp.llama_cpp'" \
    --customize-hook="'$repo/systemd/install.sh' --image \"\$1\"" \
    --customize-hook="'$here/configure-rootfs.sh' \"\$1\"" \
    --customize-hook="cp -a \"\$1/boot/firmware/.\" '$work/boot/' && rm -rf \"\$1\"/boot/firmware/*" \
    "$suite" "$work/rootfs" "$mirror" "deb http://deb.debian.org/debian-security $suite-security main"

# 3. The partitions, as files.
say "making the partitions"
root_used=$(du -sm "$work/rootfs" | cut -f1)
root_mib=$(( root_used + root_used / 4 + 256 ))  # room for the journal, logs and a first model
mkfs.vfat -F 32 -n EDGELLMBOOT -C "$work/boot.img" $(( boot_mib * 1024 )) >/dev/null
mcopy -s -i "$work/boot.img" "$work"/boot/* ::/
mkfs.ext4 -q -L EDGELLM-ROOT -d "$work/rootfs" -E root_owner=0:0 "$work/root.img" "${root_mib}M" >/dev/null
e2fsck -fn "$work/root.img" >/dev/null 2>&1

# 4. The card: MBR (what the Pi 4's boot ROM reads), boot at 8 MiB, root after it.
say "assembling $name.img"
img="$work/$name.img"
truncate -s $(( (8 + boot_mib + root_mib) * 1024 * 1024 )) "$img"
sfdisk -q "$img" <<EOT
label: dos
start=8MiB, size=${boot_mib}MiB, type=c, bootable
start=$(( 8 + boot_mib ))MiB, type=83
EOT
dd if="$work/boot.img" of="$img" bs=1M seek=8 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$img" bs=1M seek=$(( 8 + boot_mib )) conv=notrunc,sparse status=none

# 5. Compressed, with its checksum and block map.
say "compressing"
bmaptool -q create -o "$out/$name.img.bmap" "$img"
xz -T0 -6 -c "$img" > "$out/$name.img.xz.tmp"
mv "$out/$name.img.xz.tmp" "$out/$name.img.xz"
(cd "$out" && sha256sum "$name.img.xz" > "$name.img.xz.sha256")
if [ -n "${KEEP_RAW:-}" ]; then mv "$img" "$out/$name.img"; fi
say "done: $out/$name.img.xz ($(du -h "$out/$name.img.xz" | cut -f1); root filesystem ${root_used} MiB used of ${root_mib})"

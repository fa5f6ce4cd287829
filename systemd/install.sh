#!/bin/sh
# systemd/install.sh [--image] [--gpu vulkan|jetson] ROOT
#
# Puts edgellm's units, udev rule, sysusers entry, USB import script, default config and
# docs into the system at ROOT, creates the edgellm user and enables the service. The
# Python side (a venv at /opt/edgellm/versions/X.Y.Z) is installed separately (README.md);
# this makes it the current version (/opt/edgellm/current, /opt/edgellm/bin).
#   --image   ROOT is an SD-card image being built: edgellm-firstboot.service makes the
#             host name and API keys on each card's first boot.
#   otherwise ROOT is a running system (a vendor OS: Raspberry Pi OS, JetPack): API keys
#             are made now, if there are none, and printed once.
#   --gpu     add the drop-in that opens the GPU to the service (vulkan or jetson).
set -eu
image=""; gpu=""
while [ $# -gt 1 ]; do
    case "$1" in
        --image) image=1; shift ;;
        --gpu) gpu="$2"; shift 2 ;;
        *) break ;;
    esac
done
root="${1:?usage: install.sh [--image] [--gpu vulkan|jetson] ROOT}"
here="$(cd "$(dirname "$0")" && pwd)"
case "$gpu" in ""|vulkan|jetson) ;; *) echo "install.sh: unknown GPU drop-in '$gpu' (vulkan or jetson)" >&2; exit 2;; esac

install -D -m 644 -t "$root/usr/lib/systemd/system" \
    "$here/edgellm.service" "$here/edgellm-firstboot.service" "$here/edgellm-usb-import@.service" \
    "$here/edgellm-update.service" "$here/edgellm-update.path"
install -D -m 644 "$here/90-edgellm-usb-import.rules" "$root/usr/lib/udev/rules.d/90-edgellm-usb-import.rules"
install -D -m 755 "$here/edgellm-usb-import" "$root/usr/libexec/edgellm/edgellm-usb-import"
install -D -m 644 "$here/sysusers.d/edgellm.conf" "$root/usr/lib/sysusers.d/edgellm.conf"
install -D -m 644 -t "$root/opt/edgellm/share/doc" "$here/../README.md" "$here/../docs/bundle-format.md" \
    "$here/../docs/update-format.md"
# The version installed by hand (README) or by images/build.sh in /opt/edgellm/versions/X.Y.Z
# becomes the current one: the links every unit runs through, which updates switch.
opt="$root/opt/edgellm"
if [ ! -L "$opt/current" ]; then
    for dir in "$opt"/versions/*/; do
        [ -x "$dir/bin/edgellm" ] || continue
        version="$(basename "$dir")"
        printf '{"version": "%s", "installed": "%s", "signer": "", "created": ""}\n' "$version" \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$dir/edgellm-installed.json"
        ln -sfn "versions/$version" "$opt/current"
        ln -sfn current/bin "$opt/bin"
    done
fi
[ -e "$root/etc/edgellm/edgellm.toml" ] || install -D -m 600 "$here/edgellm.toml" "$root/etc/edgellm/edgellm.toml"
install -d -m 755 "$root/etc/edgellm/trusted-keys"  # root's; the public keys bundles are checked against
install -d -m 700 "$root/etc/edgellm/tls"  # root's; the box's TLS certificate (the unit loads it as credentials)
[ -z "$gpu" ] || install -D -m 644 "$here/gpu/$gpu.conf" "$root/etc/systemd/system/edgellm.service.d/gpu.conf"

systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/edgellm.conf"
owner="$(awk -F: '$1 == "edgellm" {print $3 ":" $4}' "$root/etc/passwd")"
install -d -m 750 -o "${owner%:*}" -g "${owner#*:}" "$root/var/lib/edgellm"

if [ -n "$image" ]; then
    systemctl --root="$root" enable edgellm.service edgellm-firstboot.service edgellm-update.service \
        edgellm-update.path >/dev/null 2>&1
    exit 0
fi
for name in api-keys admin-keys; do
    file="$root/etc/edgellm/$name"
    [ ! -e "$file" ] || continue
    prefix="sk-edgellm-"; [ "$name" = api-keys ] || prefix="sk-edgellm-admin-"
    key="$prefix$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')"
    (umask 077 && printf '# one key per line\n%s\n' "$key" > "$file.tmp" && mv "$file.tmp" "$file")
    echo "edgellm $name: $key  (kept in /etc/edgellm/$name, root only)"
done
if [ ! -e "$root/etc/edgellm/tls/device.pem" ]; then
    # The box's own TLS certificate; its fingerprint is what clients pin (README, "The appliance").
    if [ -x "$root/opt/edgellm/bin/edgellm" ]; then
        "$root/opt/edgellm/bin/edgellm" tls rotate --dir "$root/etc/edgellm/tls" --no-restart
    else
        echo "install.sh: /opt/edgellm is not installed yet: run 'edgellm tls rotate' before starting the service" >&2
    fi
fi
# The stamp firstboot checks: a vendor OS keeps its own host name and partitions.
echo "installed by install.sh" > "$root/var/lib/edgellm/firstboot-done"
systemctl --root="$root" enable edgellm.service edgellm-update.service edgellm-update.path >/dev/null 2>&1

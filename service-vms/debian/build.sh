#!/usr/bin/env bash
# Builds moat's Debian root filesystem image into OUT_DIR:
#   rootfs.ext4   Debian stable (minbase) plus python3, git, ca-certificates, iproute2 and
#                 any extra packages, as an ext4 filesystem made with `mke2fs -d` (no loop mount)
#   image.json    what was built from what
#   stamp         the inputs, so a rerun with the same inputs does nothing
# The image has no kernel and no init of its own: moat boots it with the base image's kernel and
# initramfs, whose init mounts it as / and starts moat-guest first (service-vms/base/init).
# Packages come from the Debian mirror the host's apt already uses (deb.debian.org if none).
#
# usage: service-vms/debian/build.sh OUT_DIR [EXTRA_PACKAGES (comma-separated)]
# needs: debootstrap, mke2fs (e2fsprogs); root (debootstrap chroots)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR [EXTRA_PACKAGES]}
extra=${2:-}
suite=${MOAT_DEBIAN_SUITE:-bookworm}
packages="python3,git,ca-certificates,iproute2${extra:+,$extra}"

for tool in debootstrap mke2fs; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing: apt-get install debootstrap e2fsprogs" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (debootstrap needs chroot)" >&2; exit 1; }

# The mirror the host's apt uses: deb822 sources first, then sources.list.
mirror=${MOAT_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ {u=$2} /^Suites:/ && u ~ /\/debian\/?$/ {print u; exit}')
fi
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

stamp="$suite $packages $(sha256sum "$here/build.sh" | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ -f "$out/rootfs.ext4" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "debian image in $out is up to date ($suite: $packages)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
echo "building debian image: $suite from $mirror with $packages" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2

# What moat expects inside: a place to mount data workspaces, a hostname, a resolver file the
# network can fill in later, and nothing cached.
mkdir -p "$root/workspaces"
echo moat > "$root/etc/hostname"
: > "$root/etc/resolv.conf"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
printf '{"name":"debian","suite":"%s","packages":"%s","mirror":"%s"}\n' "$suite" "$packages" "$mirror" \
  > "$root/etc/moat-image.json"

# Size: what the tree holds plus a quarter (at least 256 MiB) for the agent's work; workspaces
# made from the image can be grown with size_gib.
used_kib=$(du -sk "$root" | cut -f1)
size_kib=$(( used_kib + used_kib / 4 ))
[ "$size_kib" -ge 262144 ] || size_kib=262144
mkdir -p "$out"
rm -f "$work/rootfs.ext4"
mke2fs -q -t ext4 -L moat-root -d "$root" "$work/rootfs.ext4" "${size_kib}k"
cp "$root/etc/moat-image.json" "$work/image.json"
mv "$work/rootfs.ext4" "$out/rootfs.ext4"
mv "$work/image.json" "$out/image.json"
echo "$stamp" > "$out/stamp"
echo "debian image built in $out ($(( size_kib / 1024 )) MiB, $suite: $packages)"

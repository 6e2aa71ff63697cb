#!/usr/bin/env bash
# Builds moat's base guest image into OUT_DIR:
#   vmlinux            Debian's kernel, uncompressed (boots about twice as fast under TCG)
#   initramfs.cpio.gz  busybox, the vsock modules, /init, optionally moat-guest
#   image.json         what was built from what
# The kernel comes from Debian's linux-image package via `apt-get download`; nothing is
# installed into /boot. Idempotent: a stamp of the inputs (kernel version, this recipe,
# the guest agent) skips work that is already done.
#
# usage: service-vms/base/build.sh OUT_DIR [STATIC_MOAT_GUEST_BINARY]
# needs: apt-get, dpkg-deb, busybox-static, cpio, xz-utils, gzip; root (for /dev/console)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR [STATIC_MOAT_GUEST_BINARY]}
guest=${2:-}

for tool in apt-get apt-cache dpkg-deb cpio xz gzip; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing: apt-get install busybox-static cpio xz-utils" >&2; exit 1; }
done
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build.sh: $busybox is missing: apt-get install busybox-static" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (the initramfs needs /dev/console)" >&2; exit 1; }

kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n1)
if [ -z "$kver" ]; then
  apt-get update -qq
  kver=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n1)
fi
[ -n "$kver" ] || { echo "build.sh: cannot find Debian's linux-image-amd64 package" >&2; exit 1; }

guest_sum=none
[ -n "$guest" ] && guest_sum=$(sha256sum "$guest" | cut -d' ' -f1)
stamp="$kver $(cat "$here/build.sh" "$here/init" "$here/modules" | sha256sum | cut -d' ' -f1) $guest_sum"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "guest image in $out is up to date (kernel $kver)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building guest image: kernel $kver" >&2
(cd "$work" && apt-get download -qq "linux-image-$kver" 2>/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/pkg"

# The bzImage carries the kernel as an xz stream; QEMU boots the bare ELF (PVH entry) faster.
vmlinuz="$work/pkg/boot/vmlinuz-$kver"
offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)
[ -n "$offset" ] || { echo "build.sh: no xz payload in $vmlinuz" >&2; exit 1; }
tail -c +"$((offset + 1))" "$vmlinuz" | xz -dc > "$work/vmlinux" 2>/dev/null || true
head -c 4 "$work/vmlinux" | grep -q "ELF" || { echo "build.sh: extracting vmlinux failed" >&2; exit 1; }

root="$work/root"
mkdir -p "$root"/{bin,dev,etc,proc,sys,run,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
while read -r module; do
  [ -n "$module" ] || continue
  found=$(find "$work/pkg/lib/modules/$kver" -name "$module.ko*" | head -n1)
  [ -n "$found" ] || { echo "build.sh: module $module not in the kernel package" >&2; exit 1; }
  case "$found" in
    *.ko.xz) xz -dc "$found" > "$root/lib/modules/$module.ko" ;;
    *) cp "$found" "$root/lib/modules/$module.ko" ;;
  esac
done < "$here/modules"
cp "$here/modules" "$root/etc/moat-modules"
install -m 0755 "$here/init" "$root/init"
if [ -n "$guest" ]; then
  install -m 0755 "$guest" "$root/bin/moat-guest"
fi
mknod -m 600 "$root/dev/console" c 5 1
printf '{"name":"moat-base","kernel":"%s","guest_agent":%s}\n' "$kver" \
  "$([ -n "$guest" ] && echo '"included"' || echo null)" > "$root/etc/moat-image.json"

mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc -R root:root --quiet) | gzip -9 > "$work/initramfs.cpio.gz"
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
cp "$root/etc/moat-image.json" "$out/image.json"
echo "$stamp" > "$out/stamp"
echo "guest image built in $out (kernel $kver)"

#!/usr/bin/env bash
# Builds the git service VM's images into OUT_DIR from moat's Debian image (which has git and
# python3):
#   rootfs.ext4   the Debian root filesystem plus moat's git front (git-http.py: smart HTTP via
#                 `git http-backend`, per-VM credentials, per-owner repositories) started by
#                 moat's init from /etc/moat/services/git-http
#   data.ext4     an empty ext4 filesystem: the repositories' workspace is made from it
#   image.json    what was built from what
#   stamp         the inputs, so a rerun with the same inputs does nothing
# Files go in with e2fsprogs' debugfs: no loop device, no mount.
#
# usage: service-vms/git/build.sh OUT_DIR DEBIAN_ROOTFS_EXT4
# needs: debugfs and mke2fs (e2fsprogs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR DEBIAN_ROOTFS_EXT4}
debian=${2:?usage: build.sh OUT_DIR DEBIAN_ROOTFS_EXT4}
[ -f "$debian" ] || { echo "build.sh: no Debian image at $debian: run \`moat image build debian\` first" >&2; exit 1; }
for tool in debugfs mke2fs; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing: apt-get install e2fsprogs" >&2; exit 1; }
done

# Contents only (the recipe may be staged in a different directory each run).
stamp="$(cat "$debian" "$here/build.sh" "$here/git-http.py" "$here/service" | sha256sum | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ -f "$out/rootfs.ext4" ] && [ -f "$out/data.ext4" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "git image in $out is up to date"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp --sparse=always "$debian" "$work/rootfs.ext4"
base_info=$(debugfs -R "cat /etc/moat-image.json" "$work/rootfs.ext4" 2>/dev/null | tr -d '\n')
printf '{"name":"git","from":%s,"serves":"smart HTTP on port 80"}\n' "${base_info:-null}" > "$work/image.json"
cat > "$work/commands" <<CMDS
mkdir /etc/moat
mkdir /etc/moat/services
mkdir /usr/local/lib/moat
write $here/git-http.py /usr/local/lib/moat/git-http.py
write $here/service /etc/moat/services/git-http
rm /etc/moat-image.json
write $work/image.json /etc/moat-image.json
set_inode_field /usr/local/lib/moat/git-http.py mode 0100755
set_inode_field /etc/moat/services/git-http mode 0100755
CMDS
for f in /etc/moat /etc/moat/services /usr/local/lib/moat /usr/local/lib/moat/git-http.py \
         /etc/moat/services/git-http /etc/moat-image.json; do
  printf 'set_inode_field %s uid 0\nset_inode_field %s gid 0\n' "$f" "$f" >> "$work/commands"
done
debugfs -w -f "$work/commands" "$work/rootfs.ext4" >/dev/null 2>&1
# debugfs reports failures on stdout and exits 0: check that what matters is there.
for f in /usr/local/lib/moat/git-http.py /etc/moat/services/git-http; do
  debugfs -R "stat $f" "$work/rootfs.ext4" 2>/dev/null | grep -q "Mode:  0755" \
    || { echo "build.sh: $f did not make it into the image" >&2; exit 1; }
done
truncate -s 64M "$work/data.ext4"
mke2fs -q -t ext4 -L moat-git-data "$work/data.ext4"
mkdir -p "$out"
mv "$work/rootfs.ext4" "$out/rootfs.ext4"
mv "$work/data.ext4" "$out/data.ext4"
mv "$work/image.json" "$out/image.json"
echo "$stamp" > "$out/stamp"
echo "git image built in $out (rootfs.ext4 from $debian, data.ext4 empty)"

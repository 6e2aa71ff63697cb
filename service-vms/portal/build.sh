#!/usr/bin/env bash
# Builds the portal VM's root filesystem into OUT_DIR from moat's Debian image:
#   rootfs.ext4   the Debian root filesystem plus Node 24 and OpenClaw (both from npm) under
#                 /opt/openclaw, `node` and `openclaw` in /usr/local/bin, `moat-guest` there too
#                 (a link to the copy moat's init puts in /run/moat), and root's OpenClaw config
#                 with moat as its MCP server: {"command": "moat-guest", "args": ["mcp"]}
#   image.json    what was built from what
#   stamp         the inputs, so a rerun with the same inputs does nothing
# The tree is taken out of the Debian image with debugfs and packed again with `mke2fs -d`: no
# loop device, no mount. No model key is in the image: agent_create writes one into
# /root/.openclaw/.env of the portal it makes, when asked.
#
# usage: service-vms/portal/build.sh OUT_DIR DEBIAN_ROOTFS_EXT4 [OPENCLAW_PREFIX]
#   OPENCLAW_PREFIX  an npm prefix with openclaw in node_modules/ and node@24 in node/node_modules/
#                    (what .ci/setup makes in target/ci/openclaw); without it, npm installs both
#                    into OUT_DIR/npm (needs npm and the registry)
# needs: debugfs and mke2fs (e2fsprogs); root (the image's files keep their owners)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: build.sh OUT_DIR DEBIAN_ROOTFS_EXT4 [OPENCLAW_PREFIX]"
out=${1:?$usage}
debian=${2:?$usage}
prefix=${3:-}
openclaw_version=${MOAT_OPENCLAW_VERSION:-2026.9.6}
[ -f "$debian" ] || { echo "build.sh: no Debian image at $debian: run \`moat image build debian\` first" >&2; exit 1; }
for tool in debugfs mke2fs; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing: apt-get install e2fsprogs" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (the image's files must keep their owners)" >&2; exit 1; }

if [ -z "$prefix" ]; then
  command -v npm >/dev/null || { echo "build.sh: npm is missing: apt-get install npm, or pass OPENCLAW_PREFIX" >&2; exit 1; }
  prefix="$out/npm"
  node_bin="$prefix/node/node_modules/node/bin"
  if ! PATH="$node_bin:$PATH" "$prefix/node_modules/.bin/openclaw" --version 2>/dev/null | grep -q "$openclaw_version"; then
    echo "npm: node@24 and openclaw@$openclaw_version into $prefix" >&2
    mkdir -p "$prefix/node"
    for d in "$prefix" "$prefix/node"; do
      [ -f "$d/package.json" ] || echo '{"name":"moat-portal","private":true}' > "$d/package.json"
    done
    npm install --prefix "$prefix/node" --no-audit --no-fund --loglevel=error node@24 >&2
    # OpenClaw's install checks the node that runs npm: Node 24 first in PATH.
    PATH="$node_bin:$PATH" npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
      "openclaw@$openclaw_version" >&2
  fi
fi
node=$(readlink -f "$prefix/node/node_modules/node/bin/node")
[ -x "$node" ] && [ -f "$prefix/node_modules/openclaw/openclaw.mjs" ] \
  || { echo "build.sh: $prefix has no node@24 (node/node_modules/node/bin/node) or openclaw (node_modules/openclaw)" >&2; exit 1; }
node_version=$("$node" --version)
openclaw_have=$(PATH="$(dirname "$node"):$PATH" "$node" "$prefix/node_modules/openclaw/openclaw.mjs" --version | head -1)
case "$node_version" in v24.*) ;; *) echo "build.sh: OpenClaw needs Node 24; $prefix has $node_version" >&2; exit 1 ;; esac

# Contents only (the recipe may be staged in a different directory each run).
stamp="$( (cat "$debian" "$here/build.sh"; echo "$node_version $openclaw_have") | sha256sum | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ -f "$out/rootfs.ext4" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "portal image in $out is up to date ($openclaw_have, node $node_version)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir "$root"
# rdump keeps modes and (as root) owners; special files are not copied, and moat's init mounts
# /dev, /proc, /sys and /run over their directories anyway.
debugfs -R "rdump / $root" "$debian" >/dev/null 2>&1
[ -x "$root/bin/sh" ] || [ -L "$root/bin" ] || { echo "build.sh: could not read the tree out of $debian" >&2; exit 1; }

opt="$root/opt/openclaw"
mkdir -p "$opt/bin"
cp -a "$prefix/node_modules" "$opt/node_modules"
cp "$node" "$opt/bin/node"
cat > "$root/usr/local/bin/openclaw" <<'SH'
#!/bin/sh
exec /opt/openclaw/bin/node /opt/openclaw/node_modules/openclaw/openclaw.mjs "$@"
SH
chmod 0755 "$root/usr/local/bin/openclaw"
ln -sf /opt/openclaw/bin/node "$root/usr/local/bin/node"
# moat's init copies moat-guest into /run/moat when it switches to this root.
ln -sf /run/moat/moat-guest "$root/usr/local/bin/moat-guest"
mkdir -p "$root/root/.openclaw"
chmod 0700 "$root/root/.openclaw"
cat > "$root/root/.openclaw/openclaw.json" <<'JSON'
{
  "mcp": {
    "servers": {
      "moat": { "command": "moat-guest", "args": ["mcp"] }
    }
  }
}
JSON
base_info=$(tr -d '\n' < "$root/etc/moat-image.json" 2>/dev/null || true)
printf '{"name":"portal","from":%s,"node":"%s","openclaw":"%s","mcp_server":{"command":"moat-guest","args":["mcp"]}}\n' \
  "${base_info:-null}" "$node_version" "$openclaw_have" > "$root/etc/moat-image.json"
cp "$root/etc/moat-image.json" "$work/image.json"

# Size: the tree plus a quarter (at least 512 MiB free) for OpenClaw's state and the agent's work.
used_kib=$(du -sk "$root" | cut -f1)
size_kib=$(( used_kib + used_kib / 4 ))
[ $(( size_kib - used_kib )) -ge 524288 ] || size_kib=$(( used_kib + 524288 ))
mke2fs -q -t ext4 -L moat-root -d "$root" "$work/rootfs.ext4" "${size_kib}k"
mkdir -p "$out"
mv "$work/rootfs.ext4" "$out/rootfs.ext4"
mv "$work/image.json" "$out/image.json"
echo "$stamp" > "$out/stamp"
echo "portal image built in $out ($(( size_kib / 1024 )) MiB: $openclaw_have, node $node_version)"

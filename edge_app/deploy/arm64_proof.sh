#!/usr/bin/env bash
# Proof on arm64 from an x86-64 machine (not in CI: it takes a while).
#
# Builds a Debian bookworm arm64 root with debootstrap, runs it through qemu-user-static with a
# binfmt_misc handler (registered here and removed afterwards if this script registered it),
# installs the edge extra from PyPI inside it (binary wheels only), runs `bmc edge run` on BCCD
# fields with the shipped int8 model, and compares every cell's label with the same run on this
# machine. Exit status 0 only when every cell has the same top-1 label.
#
#     sudo edge_app/deploy/arm64_proof.sh [N_FIELDS]      (as root; Debian/Ubuntu host)
set -euo pipefail

N=${1:-40}
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA=${BMC_DATA:-$REPO/../shared/data}
ROOTFS=${ROOTFS:-/var/tmp/bmc-arm64-bookworm}
OUT=${OUT:-/var/tmp/bmc-arm64-proof}
[[ $EUID -eq 0 ]] || { echo "run as root" >&2; exit 1; }

apt-get install -y -q debootstrap qemu-user-static >/dev/null
# the Debian mirror this machine's apt already uses
MIRROR=$( { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
         | grep -oE '^(deb|URIs:)\s+\S+' | awk '{print $2}' | grep -v security | head -1)

registered_here=0
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
  echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
    > /proc/sys/fs/binfmt_misc/register
  registered_here=1
fi
cleanup() {
  for m in proc sys dev; do umount -l "$ROOTFS/$m" 2>/dev/null || true; done
  if [[ $registered_here == 1 ]]; then echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64; fi
}
trap cleanup EXIT

if [[ ! -x "$ROOTFS/usr/bin/python3" ]]; then
  debootstrap --arch=arm64 --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
fi
for m in proc sys dev; do mount --bind "/$m" "$ROOTFS/$m"; done
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# the host's CA bundle: where the host reaches PyPI through a TLS-inspecting proxy it trusts, the
# root must trust it too
cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ROOTFS/usr/local/share/host-ca-bundle.crt"

# the repository (without its git data) and N fields into the root
rm -rf "$ROOTFS/opt/bmc-src" "$ROOTFS/opt/fields" && mkdir -p "$ROOTFS/opt/bmc-src" "$ROOTFS/opt/fields"
tar -C "$REPO" --exclude=.git -cf - . | tar -C "$ROOTFS/opt/bmc-src" -xf -
fields=("$DATA"/bccd/JPEGImages/*.jpg)
cp "${fields[@]:0:$N}" "$ROOTFS/opt/fields/"

env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  PIP_CERT=/usr/local/share/host-ca-bundle.crt SSL_CERT_FILE=/usr/local/share/host-ca-bundle.crt \
  PIP_DISABLE_PIP_VERSION_CHECK=1 \
  chroot "$ROOTFS" /bin/bash -euc '
  uname -m
  # a minimal root with no X or GL libraries: the edge extra (headless OpenCV) needs none
  rm -rf /opt/venv && python3 -m venv /opt/venv
  /opt/venv/bin/pip install -q --only-binary=:all: "/opt/bmc-src[edge]"
  # slimmed as install.sh leaves a device
  /opt/venv/bin/pip uninstall -q -y setuptools
  /opt/venv/bin/python /opt/bmc-src/edge_app/deploy/slim.py "$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")" | tail -1
  echo "edge environment: $(du -sm /opt/venv | cut -f1) MB (LiteRT $(/opt/venv/bin/pip show ai-edge-litert | sed -n s/^Version:.//p))"
  ! /opt/venv/bin/python -c "import tensorflow" 2>/dev/null
  # ai-edge-litert 2.x segfaults when its interpreter starts under qemu-user (seen with Debian
  # bookworm qemu 7.2; not seen on hardware here): fall back to the 1.x runtime for the emulated run
  probe="from ai_edge_litert.interpreter import Interpreter; import glob; Interpreter(model_path=glob.glob(\"/opt/venv/lib/python3*/site-packages/edge_app/models/*_int8.tflite\")[0])"
  if ! /opt/venv/bin/python -c "$probe" 2>/dev/null; then
    echo "LiteRT $(/opt/venv/bin/pip show ai-edge-litert | grep ^Version) crashes under qemu-user; using ai-edge-litert<2"
    /opt/venv/bin/pip install -q --only-binary=:all: "ai-edge-litert<2"
  fi
  /opt/venv/bin/pip show ai-edge-litert | grep ^Version
  echo "edge environment as run: $(du -sm /opt/venv | cut -f1) MB"
  rm -rf /opt/session && /opt/venv/bin/bmc edge run /opt/fields --out /opt/session --headless --threads 4
'
# the same run here, on x86-64
rm -rf "$OUT" && mkdir -p "$OUT"
(cd "$REPO" && python3 -m bmc.cli edge run "$ROOTFS/opt/fields" --out "$OUT/x86" --headless)
cp "$ROOTFS/opt/session/cells.csv" "$OUT/arm64-cells.csv"
python3 - "$OUT/x86/cells.csv" "$OUT/arm64-cells.csv" <<'PY'
import csv, sys
key = lambda r: (r["source"], r["frame"], r["x"], r["y"], r["w"], r["h"])
a = {key(r): r["label"] for r in csv.DictReader(open(sys.argv[1]))}
b = {key(r): r["label"] for r in csv.DictReader(open(sys.argv[2]))}
same_cells = a.keys() == b.keys()
diff = [k for k in a if k in b and a[k] != b[k]]
print(f"x86 cells {len(a)}, arm64 cells {len(b)}, same boxes: {same_cells}, label differences: {len(diff)}")
sys.exit(0 if same_cells and not diff else 1)
PY

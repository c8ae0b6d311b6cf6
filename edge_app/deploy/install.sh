#!/usr/bin/env bash
# Install bmc edge on a Raspberry Pi (Raspberry Pi OS Bookworm) or a Jetson (Ubuntu 22.04 /
# JetPack): a virtual environment, the shipped model, a config file, a udev rule and a systemd
# service. Run as root from a checkout of the repository, or with BMC_SOURCE=bmc-edge to install
# from PyPI:
#     sudo ./edge_app/deploy/install.sh
set -euo pipefail

PREFIX=${PREFIX:-/opt/bmc}
CONFIG_DIR=${CONFIG_DIR:-/etc/bmc}
STATE_DIR=${STATE_DIR:-/var/lib/bmc}
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BMC_SOURCE=${BMC_SOURCE:-$REPO}

if [[ $EUID -ne 0 ]]; then echo "run as root (sudo $0)" >&2; exit 1; fi

# System packages: Picamera2 comes from the OS on a Pi; on a Jetson, JetPack's OpenCV has
# GStreamer for CSI cameras. Either is reached through --system-site-packages.
# opencv-python (the wheel with a GUI, for the live window) links to these even when there is no
# screen; they are tiny and present on desktop images, not always on Lite/minimal ones.
apt-get install -y libxcb1 libgl1 libglib2.0-0
SYSTEM_SITE=""
if [[ -r /proc/device-tree/model ]] && grep -qi "raspberry pi" /proc/device-tree/model; then
  apt-get install -y python3-venv python3-picamera2
  SYSTEM_SITE="--system-site-packages"
elif [[ -r /etc/nv_tegra_release ]]; then
  apt-get install -y python3-venv
  SYSTEM_SITE="--system-site-packages"
fi

id -u bmc >/dev/null 2>&1 || useradd --system --home "$STATE_DIR" --groups video bmc
python3 -m venv $SYSTEM_SITE "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip
"$PREFIX/venv/bin/pip" install --only-binary=:all: "${BMC_SOURCE}[edge]" || \
  "$PREFIX/venv/bin/pip" install "${BMC_SOURCE}[edge]"
if [[ -f /etc/nv_tegra_release ]]; then
  # prefer JetPack's OpenCV (with GStreamer) over the PyPI wheel
  "$PREFIX/venv/bin/pip" uninstall -y opencv-python || true
fi

install -d -m 0755 "$CONFIG_DIR"
[[ -f "$CONFIG_DIR/bmc.toml" ]] || install -m 0644 "$HERE/bmc.toml" "$CONFIG_DIR/bmc.toml"
install -d -o bmc -g bmc -m 0750 "$STATE_DIR" "$STATE_DIR/sessions"
install -m 0644 "$HERE/99-bmc-camera.rules" /etc/udev/rules.d/99-bmc-camera.rules
install -m 0644 "$HERE/bmc-edge.service" /etc/systemd/system/bmc-edge.service
udevadm control --reload-rules && udevadm trigger --subsystem-match=video4linux || true
systemctl daemon-reload
systemctl enable bmc-edge.service

"$PREFIX/venv/bin/bmc" edge doctor --config "$CONFIG_DIR/bmc.toml" || true
echo
echo "installed. Start now with: systemctl start bmc-edge; follow with: journalctl -u bmc-edge -f"
echo "edit $CONFIG_DIR/bmc.toml (camera, target, storage) and check it with: $PREFIX/venv/bin/bmc edge doctor --config $CONFIG_DIR/bmc.toml"

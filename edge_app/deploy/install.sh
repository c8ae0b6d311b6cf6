#!/usr/bin/env bash
# Install bmc edge on a Raspberry Pi (Raspberry Pi OS Bookworm) or a Jetson (Ubuntu 22.04 /
# JetPack): a virtual environment, the shipped model, a config file, a udev rule and a systemd
# service. Run as root from a checkout of the repository, or with BMC_SOURCE=bmc-edge to install
# from PyPI:
#     sudo ./edge_app/deploy/install.sh            # headless service (the usual clinic set-up)
#     sudo ./edge_app/deploy/install.sh --screen   # also the live window on an attached screen
set -euo pipefail

SCREEN=0
for arg in "$@"; do
  case "$arg" in
    --screen) SCREEN=1 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "unknown option $arg (known: --screen)" >&2; exit 2 ;;
  esac
done

PREFIX=${PREFIX:-/opt/bmc}
CONFIG_DIR=${CONFIG_DIR:-/etc/bmc}
STATE_DIR=${STATE_DIR:-/var/lib/bmc}
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BMC_SOURCE=${BMC_SOURCE:-$REPO}

if [[ $EUID -ne 0 ]]; then echo "run as root (sudo $0)" >&2; exit 1; fi

# System packages: Picamera2 comes from the OS on a Pi; on a Jetson, JetPack's OpenCV has
# GStreamer for CSI cameras; for the live window (--screen), the OS's OpenCV has GTK. Each is
# reached through --system-site-packages. The edge extra's own OpenCV is the headless wheel: no
# X or GL libraries, 37 MB smaller.
SYSTEM_SITE=""
OS_OPENCV=0
apt-get install -y python3-venv
if [[ -r /proc/device-tree/model ]] && grep -qi "raspberry pi" /proc/device-tree/model; then
  apt-get install -y python3-picamera2
  SYSTEM_SITE="--system-site-packages"
fi
if [[ -r /etc/nv_tegra_release ]]; then
  SYSTEM_SITE="--system-site-packages"
  OS_OPENCV=1   # JetPack's, with GStreamer
fi
if [[ $SCREEN -eq 1 ]]; then
  [[ -r /etc/nv_tegra_release ]] || apt-get install -y python3-opencv
  SYSTEM_SITE="--system-site-packages"
  OS_OPENCV=1
fi

id -u bmc >/dev/null 2>&1 || useradd --system --home "$STATE_DIR" --groups video bmc
python3 -m venv $SYSTEM_SITE "$PREFIX/venv"
PIP="$PREFIX/venv/bin/pip"
"$PIP" install --upgrade pip
"$PIP" install --only-binary=:all: "${BMC_SOURCE}[edge]" || "$PIP" install "${BMC_SOURCE}[edge]"
if [[ $OS_OPENCV -eq 1 ]]; then
  # use the OS's OpenCV; it is built against numpy 1.x, so the environment's numpy goes back to 1.x
  "$PIP" uninstall -y opencv-python-headless
  "$PIP" install --only-binary=:all: "numpy>=1.26,<2"
  "$PREFIX/venv/bin/python" -c "import cv2; print('OpenCV', cv2.__version__, 'from', cv2.__file__)"
fi
# an appliance: drop the build tool and what the app never loads (edge_app/deploy/slim.py says what)
"$PIP" uninstall -y setuptools >/dev/null 2>&1 || true
"$PREFIX/venv/bin/python" "$HERE/slim.py" "$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
du -sh "$PREFIX/venv"

install -d -m 0755 "$CONFIG_DIR"
[[ -f "$CONFIG_DIR/bmc.toml" ]] || install -m 0644 "$HERE/bmc.toml" "$CONFIG_DIR/bmc.toml"
install -d -o bmc -g bmc -m 0750 "$STATE_DIR" "$STATE_DIR/sessions"
install -m 0644 "$HERE/99-bmc-camera.rules" /etc/udev/rules.d/99-bmc-camera.rules
install -m 0644 "$HERE/bmc-edge.service" /etc/systemd/system/bmc-edge.service
install -m 0644 "$HERE/bmc-edge-ui.service" /etc/systemd/system/bmc-edge-ui.service  # the screen: not enabled
udevadm control --reload-rules && udevadm trigger --subsystem-match=video4linux || true
systemctl daemon-reload
systemctl enable bmc-edge.service

"$PREFIX/venv/bin/bmc" edge doctor --config "$CONFIG_DIR/bmc.toml" || true
echo
echo "installed. Start now with: systemctl start bmc-edge; follow with: journalctl -u bmc-edge -f"
echo "edit $CONFIG_DIR/bmc.toml (camera, target, storage) and check it with: $PREFIX/venv/bin/bmc edge doctor --config $CONFIG_DIR/bmc.toml"

#!/usr/bin/env bash
# The main job on a built-in demo: set up this Debian 12 host (packages, venv,
# libvirtd, guest image), boot small TCG guests, merge them with kernel KSM
# and show each VM's exact savings. Extra arguments go to `vmshare demo`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/integration/setup.sh"
exec "$REPO/.venv/bin/vmshare" demo "$@"

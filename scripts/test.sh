#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then
# runs every test. Safe to run again; later runs reuse the cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."

# Outside the clone, so a fresh clone still builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atomic-orchestrator/target}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: promtool checks /metrics.
packages=()
command -v promtool >/dev/null || packages+=(prometheus)
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

echo "==> cargo test (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked

#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then
# runs every test. Safe to run again; later runs reuse the cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."

# Outside the clone, so a fresh clone still builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atomic-orchestrator/target}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: promtool checks /metrics; Java and Maven run Kafka and Cassandra;
# kcat plays an outside producer; docker-compose validates compose/docker-compose.yml.
packages=()
command -v promtool >/dev/null || packages+=(prometheus)
command -v java >/dev/null || packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || packages+=(maven)
command -v kcat >/dev/null || packages+=(kcat)
command -v docker-compose >/dev/null || packages+=(docker-compose)
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# The wasm target for the rule plugins (rust-toolchain.toml also asks rustup for it).
rustup target add wasm32-wasip2 >/dev/null

# Real Kafka and Cassandra on 127.0.0.1 (jars from Maven Central, cached outside the
# clone). Stopped again at the end if this script started them.
services=compose/local-services.sh
status=$("$services" status)
if [[ $status != *"kafka: running"* || $status != *"cassandra: running"* ]]; then
  trap '"$services" stop' EXIT
fi
"$services" start
eval "$("$services" env)"

echo "==> cargo test, embedded default (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked

echo "==> the behavioural tests again, against Kafka ($KAFKA_BROKERS) and Cassandra ($CQL_NODES)"
ORCHESTRATOR_TEST_BACKEND=distributed cargo test --locked -p orchestrator \
  --test chaos --test crash --test priority --test api --test scale --test faults --test outside_producer --test webhook_outage --test runs -- \
  concurrent_events sigkill vip_preempts bad_input killed_instance a_deploy_on_one_instance service_restarts kcat_records \
  log_outage the_bridge_runs a_small_run cancel_then

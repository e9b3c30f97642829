#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then
# runs every test. Safe to run again; later runs reuse the cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."

# Outside the clone, so a fresh clone still builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atomic-orchestrator/target}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Each step says when it starts (minutes since the script began), so that a slow CI run
# shows where its time went.
began=$SECONDS
step() { echo "==> [$(( (SECONDS - began) / 60 ))m$(( (SECONDS - began) % 60 ))s] $*"; }

# Debian packages: promtool checks /metrics; Java and Maven run Kafka and Cassandra;
# kcat plays an outside producer; docker-compose validates compose/docker-compose.yml;
# chromium and npm (playwright-core) run the dashboard's browser tests.
packages=()
command -v promtool >/dev/null || packages+=(prometheus)
command -v java >/dev/null || packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || packages+=(maven)
command -v kcat >/dev/null || packages+=(kcat)
command -v docker-compose >/dev/null || packages+=(docker-compose)
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v npm >/dev/null || packages+=(nodejs npm)
if [ ${#packages[@]} -gt 0 ]; then
  step "installing Debian packages: ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# schemathesis (from PyPI, pinned) fuzzes the API against its OpenAPI document,
# componentize-py builds the Python plugin of the newcomer test, and cqlsh (Cassandra's
# own client) reads the CQL tables a redaction must leave clean; they live in a
# virtualenv outside the clone, made once.
venv="$HOME/.cache/atomic-orchestrator/venv"
if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/componentize-py" ] || [ ! -x "$venv/bin/cqlsh" ]; then
  step "installing schemathesis, componentize-py and cqlsh into $venv"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" \
    || { as_root apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q 'schemathesis==4.32.5' 'componentize-py==0.25.1' 'cqlsh==6.2.2'
fi
export SCHEMATHESIS="$venv/bin/schemathesis" COMPONENTIZE_PY="$venv/bin/componentize-py" CQLSH="$venv/bin/cqlsh"

# componentize-js (npm, pinned) builds the JavaScript plugin of the newcomer test, into
# a directory outside the clone, once.
node_tools="$HOME/.cache/atomic-orchestrator/node-tools"
if [ ! -x "$node_tools/node_modules/.bin/componentize-js" ] && command -v npm >/dev/null; then
  step "installing componentize-js into $node_tools"
  npm install --prefix "$node_tools" --no-audit --no-fund --silent '@bytecodealliance/componentize-js@0.23.0'
fi
export COMPONENTIZE_JS="$node_tools/node_modules/.bin/componentize-js"

# The wasm targets for the rule plugins and the dashboard, and the lint tools
# (rust-toolchain.toml asks for them too; the build scripts add missing targets themselves).
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null
rustup component add rustfmt clippy >/dev/null

step "formatting (rustfmt.toml) and lints (clippy, warnings are errors)"
cargo fmt --all --check
cargo fmt --manifest-path dashboard/Cargo.toml --check
# Lines fit on a screen: rustfmt keeps code to 120 columns but cannot break long
# strings or macro bodies, so those are checked here.
long=$(git ls-files -z '*.rs' | xargs -0 awk 'length($0) > 120 { print FILENAME ":" FNR ": " length($0) " columns" }')
if [[ -n $long ]]; then
  echo "lines over 120 columns (rustfmt.toml's max_width):"
  echo "$long"
  exit 1
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# The dashboard's unit tests (its compact row store) run on the host; the browser tests
# below drive the wasm build.
cargo test --manifest-path dashboard/Cargo.toml --locked --lib

# Real Kafka and Cassandra on 127.0.0.1 (jars from Maven Central, cached outside the
# clone). Stopped again at the end if this script started them.
services=compose/local-services.sh
# C1 alone: in a test run Cassandra spent 40% of its CPU in C2 compiling hot code, on
# the two cores the tests need (a fifth less CPU without it). Benches keep the full JIT.
export CASSANDRA_JVM_OPTS="${CASSANDRA_JVM_OPTS--XX:TieredStopAtLevel=1}"
status=$("$services" status)
if [[ $status != *"kafka: running"* || $status != *"cassandra: running"* ]]; then
  trap '"$services" stop' EXIT
  # Started here, so they start empty: earlier runs' keyspaces would crowd Cassandra's heap.
  "$services" stop
  "$services" wipe
fi
"$services" start
eval "$("$services" env)"

step "cargo test, embedded default (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked

# The dashboard in a real browser against the debug engine that cargo test just built.
# On CI a missing browser is a failure, never a skip.
step "dashboard browser tests (headless chromium, playwright-core)"
if [ -x /usr/bin/chromium ] && command -v npm >/dev/null; then
  # `cargo test` built target/debug/orchestrator for the integration tests; a separate
  # `cargo build -p orchestrator` would unify features differently and rebuild wasmtime.
  npm ci --prefix dashboard/tests --no-audit --no-fund
  browser_log=$(mktemp)
  if ! npm test --prefix dashboard/tests 2>&1 | tee "$browser_log"; then
    # The suite's output is long; its failures again, last, where a log's tail shows them.
    echo "==> failing browser tests:"
    awk '/^not ok/ { on = 1 } on { print } on && /^  \.\.\./ { on = 0 }' "$browser_log"
    exit 1
  fi
  # The cluster view against two engines in one group on Kafka and Cassandra.
  step "dashboard cluster view against Kafka ($KAFKA_BROKERS) and Cassandra ($CQL_NODES), two engines"
  npm run test:cluster --prefix dashboard/tests
elif [ "${CI:-}" = true ]; then
  echo "chromium (/usr/bin/chromium) or npm is missing; the dashboard's browser tests cannot run" >&2
  exit 1
else
  echo "    skipped: /usr/bin/chromium or npm missing (install: apt-get install chromium npm)"
fi

# `--workspace`, as above: selecting one package would resolve its dependencies' features
# apart from the workspace's and rebuild part of the tree (about a minute, cold or warm).
step "the behavioural tests again, against Kafka ($KAFKA_BROKERS) and Cassandra ($CQL_NODES)"
ORCHESTRATOR_TEST_BACKEND=distributed cargo test --locked --workspace \
  --test chaos --test crash --test priority --test api --test scale --test faults --test ws \
  --test outside_producer --test webhook_outage --test runs --test plugins --test reconcile --test shopify -- \
  concurrent_events sigkill vip_preempts bad_input killed_instance a_deploy_on_one_instance \
  service_restarts kcat_records log_outage the_bridge_runs a_small_run cancel_then \
  an_event_before dead_letters_can dead_letters_are a_pause a_reset_drops a_reset_stops an_update_follows \
  a_run_whose_instance a_commit_made a_what_if_run reconciliation_closes shops_sign a_customer_redaction \
  a_shop_redaction an_orders_journey the_cluster_view

# The fault suite (TESTING.md) ran on the embedded default inside `cargo test` above;
# here it runs on Kafka + Cassandra with two engines. It prints its seed.
step "the fault suite against Kafka and Cassandra"
ORCHESTRATOR_TEST_BACKEND=distributed cargo test --locked --workspace --test fault_suite

# The scale run (#15, TESTING.md): four engines in one group while instances leave and
# join in turn; the same checker, and each instance's throughput and lag.
step "the scale run: four engines on Kafka and Cassandra, leaving and joining"
ORCHESTRATOR_TEST_BACKEND=distributed cargo test --locked --workspace --test fault_suite -- --scale 4 --duration 30s
step "every test passed"

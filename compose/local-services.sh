#!/usr/bin/env bash
# Real Apache Kafka (KRaft) and Apache Cassandra 5 (our CQL stand-in for ScyllaDB) on
# 127.0.0.1, without Docker: jars from Maven Central, cached outside the repo.
#
#   compose/local-services.sh start [kafka|cassandra|all]   # idempotent; waits until ready
#   compose/local-services.sh stop  [kafka|cassandra|all]
#   compose/local-services.sh restart kafka|cassandra
#   compose/local-services.sh status
#   compose/local-services.sh wipe  [kafka|cassandra|all]   # stopped services: delete their data
#   eval "$(compose/local-services.sh env)"                  # KAFKA_BROKERS, CQL_NODES, ...
#
# Kafka listens on 127.0.0.1:9092 in plaintext and on 9094 with TLS and SASL
# (SCRAM-SHA-512, user `orchestrator`); its controller on 9093. Cassandra's native
# transport is on 127.0.0.1:9042, with password authentication (the default superuser,
# cassandra/cassandra) and optional TLS. One local CA signs both services' certificates
# (for 127.0.0.1). State, logs, pid files and the certificates live in
# $ORCHESTRATOR_SERVICES_DIR.
set -euo pipefail

KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
CASSANDRA_VERSION=${CASSANDRA_VERSION:-5.0.6}
LOG4J_VERSION=2.24.3
DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.6.1
HOME_DIR=${ORCHESTRATOR_SERVICES_DIR:-$HOME/.cache/atomic-orchestrator/services}
# More JVM options for Cassandra, split on spaces (scripts/test.sh passes a quicker JIT).
CASSANDRA_JVM_OPTS=${CASSANDRA_JVM_OPTS:-}
KAFKA_PORT=9092
KAFKA_SASL_SSL_PORT=9094
CQL_PORT=9042
TLS_DIR=$HOME_DIR/tls
# Local test credentials only: these services listen on loopback.
STORE_PASSWORD=orchestrator-local
KAFKA_SASL_USER=orchestrator
KAFKA_SASL_PASSWORD=orchestrator-local
CQL_USER=cassandra
CQL_PASSWORD=cassandra

say() { printf '[local-services] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Copies an artifact's runtime dependencies into $1/lib, once; a partial download is redone.
fetch() {
  local dir=$1 pom=$2
  [ -f "$dir/lib/.complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the jars"
  command -v java >/dev/null || die "a Java 17 runtime is needed"
  say "fetching jars into $dir/lib (once)"
  rm -rf "$dir/lib" "$dir/lib.partial"
  mkdir -p "$dir"
  printf '%s\n' "$pom" > "$dir/pom.xml"
  # A `${jmc5.path}` ERROR line from Cassandra's POM is harmless; the exit code decides.
  mvn -q -B -f "$dir/pom.xml" "$DEPENDENCY_PLUGIN:copy-dependencies" \
      -DincludeScope=runtime -DoutputDirectory="$dir/lib.partial" >"$dir/fetch.log" 2>&1 \
    || { tail -20 "$dir/fetch.log" >&2; die "mvn could not fetch the jars (log: $dir/fetch.log)"; }
  mv "$dir/lib.partial" "$dir/lib"
  touch "$dir/lib/.complete"
}

pom() {  # groupId:artifactId:version ... -> a pom-only project depending on them
  local deps=""
  for coord in "$@"; do
    IFS=: read -r g a v <<<"$coord"
    deps+="<dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"
  done
  echo "<project xmlns=\"http://maven.apache.org/POM/4.0.0\"><modelVersion>4.0.0</modelVersion><groupId>local</groupId><artifactId>services</artifactId><version>1</version><packaging>pom</packaging><dependencies>$deps</dependencies></project>"
}

# Waits for a port and, if given, a log line; on failure stops the process and shows its log.
wait_ready() {
  local name=$1 port=$2 pidfile=$3 log=$4 line=${5:-} seconds=${6:-90}
  local deadline=$((SECONDS + seconds))
  while [ $SECONDS -lt $deadline ]; do
    if ! pid_alive "$pidfile"; then
      tail -40 "$log" >&2 || true
      rm -f "$pidfile"
      die "$name exited during start (log: $log)"
    fi
    if port_open "$port" && { [ -z "$line" ] || grep -q "$line" "$log" 2>/dev/null; }; then
      say "$name ready on 127.0.0.1:$port"
      return 0
    fi
    sleep 1
  done
  tail -40 "$log" >&2 || true
  stop_one "$name" "$pidfile"
  die "$name not ready after ${seconds}s (log: $log)"
}

stop_one() {
  local name=$1 pidfile=$2
  if pid_alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# A local CA and a certificate for 127.0.0.1 signed by it, once: PEM for clients,
# PKCS12 key and trust stores for the JVM services.
tls_material() {
  [ -f "$TLS_DIR/.complete" ] && return 0
  command -v openssl >/dev/null || die "openssl is needed to make the local certificates"
  command -v keytool >/dev/null || die "keytool (Java 17) is needed to make the local trust store"
  say "making a local CA and a certificate for 127.0.0.1 in $TLS_DIR (once)"
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  chmod 700 "$TLS_DIR"
  (
    cd "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=orchestrator local CA" \
        -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile san.ext -out server.pem
    openssl pkcs12 -export -in server.pem -inkey server.key -certfile ca.pem -name server \
        -passout "pass:$STORE_PASSWORD" -out server.p12
    keytool -importcert -noprompt -alias ca -file ca.pem -keystore trust.p12 -storetype PKCS12 \
        -storepass "$STORE_PASSWORD"
  ) >"$HOME_DIR/tls.log" 2>&1 || { cat "$HOME_DIR/tls.log" >&2; die "making the local certificates failed"; }
  touch "$TLS_DIR/.complete"
}

# The SCRAM user of the SASL listener, once per log dir (idempotent anyway).
kafka_scram_user() {
  local dir=$1
  [ -f "$dir/data/.scram-user" ] && return 0
  java -cp "$dir/lib/*" kafka.admin.ConfigCommand --bootstrap-server 127.0.0.1:$KAFKA_PORT --alter \
      --add-config "SCRAM-SHA-512=[iterations=4096,password=$KAFKA_SASL_PASSWORD]" \
      --entity-type users --entity-name "$KAFKA_SASL_USER" >"$dir/scram.log" 2>&1 \
    || { cat "$dir/scram.log" >&2; die "adding Kafka's SCRAM user failed"; }
  touch "$dir/data/.scram-user"
}

start_kafka() {
  local dir=$HOME_DIR/kafka pidfile=$HOME_DIR/kafka/kafka.pid
  if pid_alive "$pidfile" && port_open $KAFKA_PORT; then say "kafka already running"; return 0; fi
  port_open $KAFKA_PORT && die "port $KAFKA_PORT is taken by another process"
  fetch "$dir" "$(pom "org.apache.kafka:kafka_2.13:$KAFKA_VERSION" \
      "org.apache.logging.log4j:log4j-api:$LOG4J_VERSION" "org.apache.logging.log4j:log4j-core:$LOG4J_VERSION" \
      "org.apache.logging.log4j:log4j-slf4j-impl:$LOG4J_VERSION")"
  port_open $KAFKA_SASL_SSL_PORT && die "port $KAFKA_SASL_SSL_PORT is taken by another process"
  tls_material
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:9093
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:9093,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=$STORE_PASSWORD
ssl.key.password=$STORE_PASSWORD
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  cat >"$dir/log4j2.properties" <<EOF
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$dir/kafka.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
EOF
  # Idempotent: an already formatted log dir is left as it is.
  java -cp "$dir/lib/*" kafka.tools.StorageTool format --ignore-formatted \
      -t 4L6g3nShT-eMCtK--X86sw -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
    || { cat "$dir/format.log" >&2; die "formatting Kafka's storage failed"; }
  say "starting kafka $KAFKA_VERSION"
  : >"$dir/kafka.log"
  nohup java -Xms256m -Xmx512m -XX:+UseG1GC -Dlog4j2.configurationFile="$dir/log4j2.properties" \
      -cp "$dir/lib/*" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  wait_ready kafka $KAFKA_PORT "$pidfile" "$dir/stdout.log" "" 90
  kafka_scram_user "$dir"
}

start_cassandra() {
  local dir=$HOME_DIR/cassandra pidfile=$HOME_DIR/cassandra/cassandra.pid
  if pid_alive "$pidfile" && port_open $CQL_PORT; then say "cassandra already running"; return 0; fi
  port_open $CQL_PORT && die "port $CQL_PORT is taken by another process"
  fetch "$dir" "$(pom "org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION")"
  tls_material
  # A fresh data dir gets its default superuser during this start: wait for it then.
  local role_line=""
  [ -d "$dir/data" ] || role_line="Created default superuser role"
  mkdir -p "$dir/data" "$dir/tmp"
  cat >"$dir/cassandra.yaml" <<EOF
cluster_name: orchestrator-local
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
native_transport_port: $CQL_PORT
start_native_transport: true
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1"
commitlog_sync: periodic
commitlog_sync_period: 10s
# Cassandra 4.1+'s Paxos: fewer round trips and system-table writes per conditional
# write than v1 (5.0's default). ScyllaDB, the target, has its own LWT; a v1 Cassandra
# only made every test and bench slower.
paxos_variant: v2
auto_snapshot: false
# Slabbed memtables take a 1 MiB region per written table: the tests make hundreds of
# tables (a keyspace each), which exhausted the heap (OutOfMemoryError in CI).
memtable_allocation_type: unslabbed_heap_buffers
authenticator: PasswordAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager
client_encryption_options:
  enabled: true
  optional: true
  keystore: $TLS_DIR/server.p12
  keystore_password: $STORE_PASSWORD
  truststore: $TLS_DIR/trust.p12
  truststore_password: $STORE_PASSWORD
  store_type: PKCS12
  require_client_auth: false
EOF
  cat >"$dir/logback.xml" <<EOF
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$dir/cassandra.log</file>
    <encoder><pattern>%level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
  local jamm; jamm=$(ls "$dir"/lib/jamm-*.jar | head -1)
  local opens=(
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED --add-opens java.base/java.util=ALL-UNNAMED
    --add-opens java.base/java.nio=ALL-UNNAMED
  )
  local extra=(); read -ra extra <<<"$CASSANDRA_JVM_OPTS"
  say "starting cassandra $CASSANDRA_VERSION"
  : >"$dir/cassandra.log"
  # A heap that runs out stops the service, loudly, instead of timing out every write after.
  # 2 GiB: the tests' hundreds of tables kept G1 marking a 1 GiB heap all the time
  # (Cassandra used a fifth more CPU, on the cores the tests share).
  nohup java -Xms2g -Xmx2g -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError "${opens[@]}" "${extra[@]}" \
      -javaagent:"$jamm" -Djdk.attach.allowAttachSelf=true \
      -Dcassandra.config="file://$dir/cassandra.yaml" -Dcassandra-foreground=yes \
      -Dcassandra.storagedir="$dir/data" -Dlogback.configurationFile="$dir/logback.xml" \
      -Djna.tmpdir="$dir/tmp" -Djava.io.tmpdir="$dir/tmp" \
      -Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.superuser_setup_delay_ms=0 -Dcassandra.unsafesystem=true \
      -Dio.netty.tryReflectionSetAccessible=true \
      -cp "$dir/lib/*" org.apache.cassandra.service.CassandraDaemon >"$dir/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  wait_ready cassandra $CQL_PORT "$pidfile" "$dir/cassandra.log" "Startup complete" 180
  [ -z "$role_line" ] || wait_ready cassandra $CQL_PORT "$pidfile" "$dir/cassandra.log" "$role_line" 60
}

which_services() { case "${1:-all}" in all) echo "kafka cassandra";; kafka|cassandra) echo "$1";; *) die "unknown service $1";; esac; }

cmd=${1:-status}
case "$cmd" in
  start) for s in $(which_services "${2:-all}"); do "start_$s"; done ;;
  stop) for s in $(which_services "${2:-all}"); do stop_one "$s" "$HOME_DIR/$s/$s.pid"; done ;;
  restart) for s in $(which_services "${2:?restart which service?}"); do stop_one "$s" "$HOME_DIR/$s/$s.pid"; "start_$s"; done ;;
  # Test data only: every test makes its own topics and keyspace, and hundreds of
  # keyspaces outgrow Cassandra's 1 GB heap.
  wipe)
    for s in $(which_services "${2:-all}"); do
      pid_alive "$HOME_DIR/$s/$s.pid" && die "$s is running; stop it first"
      rm -rf "${HOME_DIR:?}/$s/data"
      say "$s: data deleted"
    done ;;
  status)
    for s in kafka cassandra; do
      port=$([ $s = kafka ] && echo $KAFKA_PORT || echo $CQL_PORT)
      if pid_alive "$HOME_DIR/$s/$s.pid" && port_open "$port"; then echo "$s: running (pid $(cat "$HOME_DIR/$s/$s.pid"), 127.0.0.1:$port)"; else echo "$s: stopped"; fi
    done ;;
  env)
    echo "export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT CQL_NODES=127.0.0.1:$CQL_PORT"
    echo "export ORCHESTRATOR_CQL_USERNAME=$CQL_USER ORCHESTRATOR_CQL_PASSWORD=$CQL_PASSWORD"
    # For the tests of the encrypted, authenticated connections (SECURITY.md).
    echo "export KAFKA_SASL_SSL_BROKERS=127.0.0.1:$KAFKA_SASL_SSL_PORT SERVICES_CA_FILE=$TLS_DIR/ca.pem"
    echo "export KAFKA_SASL_USERNAME=$KAFKA_SASL_USER KAFKA_SASL_PASSWORD=$KAFKA_SASL_PASSWORD" ;;
  *) die "usage: $0 start|stop|restart|status|wipe|env [kafka|cassandra|all]" ;;
esac

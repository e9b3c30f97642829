//! Test harness: runs the real `orchestrator` binary as a child process and talks to it
//! over HTTP and WebSocket, as a user would.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The API token every test engine gets.
pub const TOKEN: &str = "test-token";

pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub port: u16,
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    /// Kafka + CQL arguments when the suite runs against real services, else empty.
    backend_args: Vec<String>,
}

/// `ORCHESTRATOR_TEST_BACKEND=distributed` runs the same tests against Kafka and the CQL
/// store named by `KAFKA_BROKERS` and `CQL_NODES`; otherwise the embedded default.
pub fn distributed() -> bool {
    std::env::var("ORCHESTRATOR_TEST_BACKEND").as_deref() == Ok("distributed")
}

/// For a test whose faults or checks exist on the embedded default only: run against
/// Kafka + CQL it fails at once, saying why, instead of failing somewhere odd.
pub fn embedded_only(why: &str) {
    assert!(!distributed(), "this test runs on the embedded default only: {why}");
}

/// Fresh topics, group and keyspace for one engine (kept across its restarts).
pub fn backend_args() -> Vec<String> {
    if !distributed() {
        return Vec::new();
    }
    let brokers = service("KAFKA_BROKERS").expect("distributed tests need KAFKA_BROKERS");
    let nodes = service("CQL_NODES").expect("distributed tests need CQL_NODES");
    let name = unique("t");
    let group = format!("{name}.engine");
    [
        "--kafka-brokers",
        &brokers,
        "--cql-nodes",
        &nodes,
        "--kafka-topic-prefix",
        &name,
        "--kafka-group",
        &group,
        "--kafka-partitions",
        "4",
        "--cql-keyspace",
        &name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `orchestrator` binary with no backend or token taken from the environment: only
/// the arguments a test gives choose them.
pub fn orchestrator() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    c.env_remove("KAFKA_BROKERS").env_remove("CQL_NODES").env_remove("ORCHESTRATOR_API_TOKEN");
    c.env_remove("SHOPIFY_WEBHOOK_SECRET").env_remove("SHOPIFY_ADMIN_TOKEN");
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// Starts an engine on the embedded default in `data_dir` and waits until it answers.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[]).await
    }

    pub async fn start_with(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::launch(data_dir, extra_args.iter().map(|s| s.to_string()).collect(), backend_args()).await
    }

    async fn launch(data_dir: &Path, extra_args: Vec<String>, backend_args: Vec<String>) -> Self {
        let port = free_port();
        let mut s = Server {
            child: None,
            base: format!("http://127.0.0.1:{port}"),
            port,
            data_dir: data_dir.to_path_buf(),
            extra_args,
            backend_args,
        };
        s.spawn().await;
        s
    }

    /// An engine on the backends `backend_args` name (see `backend_args`).
    pub async fn start_on(data_dir: &Path, backend_args: Vec<String>) -> Self {
        Self::launch(data_dir, Vec::new(), backend_args).await
    }

    /// Another engine on the same Kafka topics, group and keyspace as `other`.
    pub async fn start_beside(data_dir: &Path, other: &Server) -> Self {
        Self::launch(data_dir, other.extra_args.clone(), other.backend_args.clone()).await
    }

    async fn spawn(&mut self) {
        let child = orchestrator()
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--api-token", TOKEN])
            .args(&self.backend_args)
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(engine_log(self.port))
            .spawn()
            .expect("the orchestrator binary starts");
        self.child = Some(child);
        // A liveness bound, not a speed check: on two cores shared with Kafka, Cassandra
        // and other engines, a start has been seen to take most of a minute.
        let deadline = Instant::now() + Duration::from_secs(120);
        let probe = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        loop {
            let last = match probe.get(format!("{}/health", self.base)).send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => format!("no answer: {e}"),
            };
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("engine exited during start: {status}");
            }
            assert!(Instant::now() < deadline, "engine did not become healthy in 120 s; /health said {last}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM to the running engine and hands over its process.
    fn sigterm(&mut self) -> std::process::Child {
        let c = self.child.take().expect("running");
        // SAFETY: plain signal to our own child process.
        unsafe { libc_kill(c.id() as i32, 15) };
        c
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm().wait().unwrap()
    }

    /// SIGTERM, then its exit status if it stops within `within`; past that it is
    /// killed and the answer says so.
    pub fn stop_within(&mut self, within: Duration) -> Result<std::process::ExitStatus, String> {
        let mut c = self.sigterm();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c.kill().unwrap();
        c.wait().unwrap();
        Err(format!("did not stop within {within:?} of SIGTERM; killed"))
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The Kafka and CQL arguments of this engine (empty on the embedded default).
    pub fn backend_args(&self) -> &[String] {
        &self.backend_args
    }

    /// The Kafka topic prefix of this engine, in the distributed pass.
    pub fn kafka_prefix(&self) -> Option<String> {
        self.backend_args.iter().position(|a| a == "--kafka-topic-prefix").map(|i| self.backend_args[i + 1].clone())
    }

    /// The CQL keyspace this engine writes, when it runs on Kafka + CQL.
    pub fn keyspace(&self) -> Option<String> {
        let at = self.backend_args.iter().position(|a| a == "--cql-keyspace")?;
        self.backend_args.get(at + 1).cloned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub async fn post_events(&self, events: &Value) -> reqwest::Response {
        client().post(self.url("/orders/events")).bearer_auth(TOKEN).json(events).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = client().get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn health(&self) -> Value {
        self.get_json("/health").await.1
    }

    /// Waits until the log is drained (nothing queued). Kafka's lag is sampled every
    /// 200 ms, so there it must read zero several times in a row.
    ///
    /// Fails when the pipeline stalls: no event settled and the healthy queue unchanged
    /// for `stall` (at least 60 s). A busy machine makes it wait longer, not fail; 15
    /// minutes in all is the bound that keeps a flapping engine from hanging the suite.
    pub async fn drain(&self, stall: Duration) {
        let stall = stall.max(Duration::from_secs(60));
        let give_up = Instant::now() + Duration::from_secs(900);
        let needed = if distributed() { 4 } else { 1 };
        let mut zeros = 0;
        let (mut last, mut moved_at) = (None, Instant::now());
        loop {
            let h = self.health().await;
            let depth =
                h["queue_depth"]["vip"].as_u64().unwrap_or(1) + h["queue_depth"]["normal"].as_u64().unwrap_or(1);
            // While a backend is down its lag is not known, so only a healthy zero counts.
            zeros = if depth == 0 && h["status"] == "ok" { zeros + 1 } else { 0 };
            if zeros >= needed {
                return;
            }
            // Movement is events settling, or the queue changing while its depth is known.
            let settled = ["applied", "skipped", "rejected", "duplicates", "parked", "released"]
                .map(|k| h[k].as_u64().unwrap_or(0));
            let known_depth = (h["status"] == "ok").then_some(depth);
            if last.is_none_or(|(s, d)| s != settled || (known_depth.is_some() && d != known_depth)) {
                (last, moved_at) = (Some((settled, known_depth)), Instant::now());
            }
            assert!(moved_at.elapsed() < stall, "the pipeline stalled for {stall:?} before the log drained: {h}");
            assert!(Instant::now() < give_up, "the log did not drain in 15 minutes: {h}");
            tokio::time::sleep(Duration::from_millis(if distributed() { 250 } else { 50 })).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The engine's log lines: to the test's stderr, or appended to a file per engine in
/// `ORCHESTRATOR_TEST_ENGINE_LOGS` (a suite with many expected errors keeps them there).
fn engine_log(port: u16) -> Stdio {
    let Some(dir) = std::env::var_os("ORCHESTRATOR_TEST_ENGINE_LOGS") else { return Stdio::inherit() };
    let path = Path::new(&dir).join(format!("engine-{port}.log"));
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
    file.map(Stdio::from).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap()
}

/// A client that sends the admin token on every request.
pub fn authorized() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {TOKEN}").parse().unwrap());
    reqwest::Client::builder().pool_max_idle_per_host(64).default_headers(headers).build().unwrap()
}

pub fn created(order_id: &str, event_id: &str, tier: &str, total_cents: i64) -> Value {
    json!({
        "event_id": event_id,
        "order_id": order_id,
        "kind": "created",
        "source": "test",
        "occurred_at": "2026-11-21T10:00:00Z",
        "payload": {
            "customer": format!("{order_id}@example.com"),
            "tier": tier,
            "total_cents": total_cents,
            "currency": "USD"
        }
    })
}

pub fn updated(order_id: &str, event_id: &str, payload: Value) -> Value {
    json!({
        "event_id": event_id,
        "order_id": order_id,
        "kind": "updated",
        "source": "test",
        "occurred_at": "2026-11-21T10:00:01Z",
        "payload": payload
    })
}

/// All history entries of an order (one page of up to 1000: the tests' orders hold fewer).
pub async fn history(server: &Server, order_id: &str) -> Vec<Value> {
    let (status, body) = server.get_json(&format!("/orders/{order_id}/history?limit=1000")).await;
    assert_eq!(status, 200, "history of {order_id}: {body}");
    assert!(body["next_cursor"].is_null(), "more than one page of history for {order_id}");
    body["items"].as_array().unwrap().clone()
}

/// A built plugin fixture or default plugin, by file stem (`fixture_trap`, `order_rules`).
pub fn plugin(name: &str) -> Vec<u8> {
    let path = format!("{}/{name}.wasm", orchestrator::plugin::FIXTURES_DIR);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `wasm` with a custom section of `size` bytes: another valid component (as large as
/// a Python one, if need be) that decides as `wasm` does.
pub fn padded(mut wasm: Vec<u8>, size: usize) -> Vec<u8> {
    let leb = |mut n: usize| {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                return out;
            }
        }
    };
    let name = b"padding";
    let mut payload = leb(name.len());
    payload.extend(name);
    payload.extend(std::iter::repeat_n(7u8, size));
    wasm.push(0);
    wasm.extend(leb(payload.len()));
    wasm.extend(payload);
    wasm
}

impl Server {
    /// PUT /plugins/{slot}, with the token.
    pub async fn deploy(&self, slot: &str, bytes: Vec<u8>, shadow: bool) -> reqwest::Response {
        let url = self.url(&format!("/plugins/{slot}{}", if shadow { "?shadow=true" } else { "" }));
        client().put(url).bearer_auth(TOKEN).body(bytes).send().await.unwrap()
    }

    /// Deploys and expects 201, showing the engine's answer if it is anything else.
    pub async fn deploy_ok(&self, slot: &str, bytes: Vec<u8>, shadow: bool) -> Value {
        let r = self.deploy(slot, bytes, shadow).await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 201, "deploy {slot}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn post_authorized(&self, path: &str) -> reqwest::Response {
        client().post(self.url(path)).bearer_auth(TOKEN).send().await.unwrap()
    }

    /// The `decided_by` of the active version of a slot.
    pub async fn active(&self, slot: &str) -> (u64, String) {
        let (_, slots) = self.get_json("/plugins").await;
        let s = slots.as_array().unwrap().iter().find(|s| s["slot"] == slot).unwrap().clone();
        (s["active"]["version"].as_u64().unwrap(), s["active"]["decided_by"].as_str().unwrap().to_string())
    }
}

/// The address of a real service from the environment (`KAFKA_BROKERS`, `CQL_NODES`).
/// Missing in CI is a failure, never a skip; elsewhere the test says why it did nothing.
pub fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "{var} is not set: CI runs integration tests against real services \
                 (start them with compose/local-services.sh)"
            )
        }
        _ => {
            eprintln!("{var} not set: start compose/local-services.sh and export it to run this test");
            None
        }
    }
}

/// A command-line tool the tests drive, named by `var` (`SCHEMATHESIS`, `COMPONENTIZE_PY`)
/// or found on PATH under its default name. Missing on CI is a failure, never a skip.
pub fn tool(var: &str) -> Option<String> {
    let default = var.to_ascii_lowercase().replace('_', "-");
    let bin = std::env::var(var).unwrap_or(default);
    if std::process::Command::new(&bin).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{bin} ({var}) is required on CI; scripts/test.sh installs it"
    );
    eprintln!("{bin} is not installed ({var}); the README's test command installs it. Not checked here.");
    None
}

/// A name no other test run uses (topics, groups, keyspaces).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Delivers a Shopify webhook the way Shopify does (signature optional, to test refusals).
pub async fn deliver(
    s: &Server,
    topic: &str,
    webhook_id: &str,
    body: &[u8],
    signature: Option<String>,
) -> reqwest::Response {
    deliver_from(s, "example.myshopify.com", topic, webhook_id, body, signature).await
}

/// [`deliver`] from a shop of its own.
pub async fn deliver_from(
    s: &Server,
    shop: &str,
    topic: &str,
    webhook_id: &str,
    body: &[u8],
    signature: Option<String>,
) -> reqwest::Response {
    let mut req = client()
        .post(s.url("/webhooks/shopify"))
        .header("content-type", "application/json")
        .header("x-shopify-topic", topic)
        .header("x-shopify-shop-domain", shop)
        .header("x-shopify-webhook-id", webhook_id)
        .header("x-shopify-api-version", "2025-10")
        .body(body.to_vec());
    if let Some(sig) = signature {
        req = req.header("x-shopify-hmac-sha256", sig);
    }
    req.send().await.unwrap()
}

/// Runs `compose/local-services.sh <action> <service>` (start, stop, restart).
pub fn local_services(action: &str, service: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../compose/local-services.sh");
    let out = Command::new("bash").args([script, action, service]).output().unwrap();
    assert!(out.status.success(), "{action} {service}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A Kafka log of its own for a test: topics and group named after `name`.
pub fn kafka_config(brokers: String, name: &str, partitions: i32) -> orchestrator::log::kafka::KafkaConfig {
    orchestrator::log::kafka::KafkaConfig {
        brokers,
        vip_topic: format!("{name}.vip"),
        normal_topic: format!("{name}.normal"),
        changes_topic: format!("{name}.changes"),
        dlq_topic: format!("{name}.dlq"),
        plugins_topic: format!("{name}.plugins"),
        control_topic: format!("{name}.control"),
        pulse_topic: format!("{name}.pulse"),
        partitions,
        replication: 1,
        group: format!("{name}.engine"),
        security: Default::default(),
    }
}

/// A keyspace of its own on the CQL nodes, with the login the local services print
/// (`compose/local-services.sh env`), as the engine reads it from the environment.
pub fn cql_config(nodes: &str, keyspace: &str) -> orchestrator::store::cql::CqlConfig {
    let login = std::env::var("ORCHESTRATOR_CQL_USERNAME").ok().map(|username| orchestrator::store::cql::CqlLogin {
        username,
        password: orchestrator::secret::Secret::new(std::env::var("ORCHESTRATOR_CQL_PASSWORD").unwrap_or_default()),
    });
    orchestrator::store::cql::CqlConfig {
        nodes: nodes.split(',').map(str::to_string).collect(),
        keyspace: keyspace.to_string(),
        replication_factor: 1,
        login,
        tls: None,
    }
}

/// Runs kcat with `stdin` (records to produce, say); its stdout.
pub fn kcat(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat is installed");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kcat {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A counter's value in `/metrics`, by its series (`name{labels}`).
pub async fn counter(s: &Server, series: &str) -> u64 {
    let metrics = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value = metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_string));
    value.unwrap_or_else(|| panic!("no {series} in /metrics")).parse().unwrap()
}

/// Every value of every table in the SQLite files under `data_dir` (store, cases, log),
/// as text: what a redaction test searches for what must be gone.
pub fn sqlite_dump(data_dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(data_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "sqlite") {
            continue;
        }
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut tables = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").unwrap();
        let names: Vec<String> = tables.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        for table in names {
            let mut rows = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
            let columns = rows.column_count();
            let mut rows = rows.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                for i in 0..columns {
                    match row.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            out.push_str(&String::from_utf8_lossy(t));
                        }
                        other => out.push_str(&format!("{other:?}")),
                    }
                    out.push('\t');
                }
                out.push('\n');
            }
        }
    }
    out
}

/// Runs CQL with cqlsh (Apache Cassandra's own client, `CQLSH`) and returns what it prints.
pub fn cqlsh(cql: &str) -> String {
    let cqlsh = std::env::var("CQLSH").expect("CQLSH names cqlsh (scripts/test.sh installs it)");
    let node = std::env::var("CQL_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let node = node.split(',').next().unwrap().to_string();
    let (host, port) = node.rsplit_once(':').unwrap_or((&node, "9042"));
    let mut cmd = Command::new(&cqlsh);
    if let (Ok(user), Ok(password)) =
        (std::env::var("ORCHESTRATOR_CQL_USERNAME"), std::env::var("ORCHESTRATOR_CQL_PASSWORD"))
    {
        cmd.args(["-u", &user, "-p", &password]);
    }
    let out = cmd.args([host, port, "--request-timeout", "60", "-e", cql]).output().expect("cqlsh runs");
    assert!(out.status.success(), "cqlsh {cql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every row of every table in `keyspace`, read by cqlsh, as it prints them.
pub fn cql_dump(keyspace: &str) -> String {
    let run = cqlsh;
    let listed = run(&format!("SELECT table_name FROM system_schema.tables WHERE keyspace_name = '{keyspace}'"));
    let tables: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .filter(|l| *l != "table_name")
        .collect();
    assert!(tables.contains(&"orders"), "cqlsh lists the keyspace's tables: {listed}");
    let dump: Vec<String> = tables.iter().map(|t| format!("SELECT * FROM {keyspace}.{t};")).collect();
    run(&format!("PAGING OFF; {}", dump.join(" ")))
}

/// Lints a `/metrics` page with promtool (required in CI; skipped with a note elsewhere).
pub fn check_with_promtool(text: &str) {
    use std::io::Write;
    let spawn = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawn {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("promtool not installed ({e}); the README's test command installs it. Not checked here.");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

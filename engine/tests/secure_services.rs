//! Encrypted, authenticated connections to the services: Kafka over TLS with SASL
//! SCRAM-SHA-512, and the CQL nodes over TLS with a password, as the local services
//! offer them (`compose/local-services.sh env`). A wrong credential or CA stops the
//! engine at start with an error that names it, and never prints the secret.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, authorized, created, orchestrator, service, unique};

/// What the engine needs to reach both services securely.
struct Secure {
    brokers: String,
    nodes: String,
    ca: String,
    kafka_user: String,
    kafka_password: String,
    cql_user: String,
    cql_password: String,
}

impl Secure {
    fn from_env() -> Option<Self> {
        Some(Self {
            brokers: service("KAFKA_SASL_SSL_BROKERS")?,
            nodes: service("CQL_NODES")?,
            ca: service("SERVICES_CA_FILE")?,
            kafka_user: service("KAFKA_SASL_USERNAME")?,
            kafka_password: service("KAFKA_SASL_PASSWORD")?,
            cql_user: service("ORCHESTRATOR_CQL_USERNAME")?,
            cql_password: service("ORCHESTRATOR_CQL_PASSWORD")?,
        })
    }

    /// The engine's backend flags; passwords go in private files, never in flags.
    fn args(&self, dir: &Path) -> Vec<String> {
        let kafka_password = secret_file(dir, "kafka-password", &self.kafka_password);
        let cql_password = secret_file(dir, "cql-password", &self.cql_password);
        let name = unique("tls");
        let flags = [
            ("--kafka-brokers", self.brokers.clone()),
            ("--kafka-security-protocol", "sasl_ssl".into()),
            ("--kafka-ca-file", self.ca.clone()),
            ("--kafka-sasl-username", self.kafka_user.clone()),
            ("--kafka-sasl-password-file", kafka_password),
            ("--cql-nodes", self.nodes.clone()),
            ("--cql-ca-file", self.ca.clone()),
            ("--cql-username", self.cql_user.clone()),
            ("--cql-password-file", cql_password),
            ("--kafka-topic-prefix", name.clone()),
            ("--kafka-group", format!("{name}.engine")),
            ("--kafka-partitions", "2".into()),
            ("--cql-keyspace", name),
        ];
        flags.into_iter().flat_map(|(flag, value)| [flag.to_string(), value]).collect()
    }
}

fn secret_file(dir: &Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// Sets `flag`'s value in `args`.
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} is among the args"));
    args[at + 1] = value.to_string();
    args
}

/// A CA that signed nothing the services show.
fn stranger_ca(dir: &Path) -> String {
    let (key, cert) = (dir.join("stranger.key"), dir.join("stranger.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    cert.display().to_string()
}

/// Starts an engine that must refuse to start; returns what it said.
fn refused(dir: &Path, args: &[String]) -> String {
    let data: PathBuf = dir.join(unique("data"));
    let mut child = orchestrator()
        .args(["serve", "--listen", "127.0.0.1:0", "--api-token", "t0ken-for-the-secure-tests"])
        .arg("--data-dir")
        .arg(&data)
        .args(args)
        .env_remove("ORCHESTRATOR_CQL_PASSWORD")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the engine still runs after 60 s with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the engine refused to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_over_tls_with_scram_to_kafka_and_tls_with_a_password_to_cql() {
    let Some(secure) = Secure::from_env() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_on(dir.path(), secure.args(dir.path())).await;
    assert_eq!(s.post_events(&created("tls-1", "tls-e1", "GOLD", 4_200)).await.status(), 202);
    // Polled: the group's lag, which `drain` reads, lags the append by a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let order = loop {
        let answer = authorized().get(s.url("/orders/tls-1")).send().await.unwrap();
        if answer.status() == 200 {
            break answer.json::<serde_json::Value>().await.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "the order was not applied in 60 s: {:?}", s.health().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((order["version"].as_u64(), order["total_cents"].as_i64()), (Some(1), Some(4_200)), "{order}");
}

#[test]
fn a_wrong_credential_or_ca_stops_the_engine_naming_it() {
    let Some(secure) = Secure::from_env() else { return };
    let dir = tempfile::tempdir().unwrap();
    let good = secure.args(dir.path());
    let stranger = stranger_ca(dir.path());
    let wrong = secret_file(dir.path(), "wrong", "not-the-password-7f3a");

    let said = refused(dir.path(), &with(good.clone(), "--kafka-sasl-password-file", &wrong));
    assert!(said.contains("refused") && said.to_lowercase().contains("authentication"), "Kafka login: {said}");
    assert!(!said.contains("not-the-password-7f3a"), "the password is never printed: {said}");
    let said = refused(dir.path(), &with(good.clone(), "--kafka-ca-file", &stranger));
    assert!(said.contains("refused") && said.contains("certificate verify failed"), "Kafka CA: {said}");
    let said = refused(dir.path(), &with(good.clone(), "--cql-password-file", &wrong));
    assert!(said.to_lowercase().contains("authentic") || said.contains("credentials"), "CQL login: {said}");
    assert!(!said.contains("not-the-password-7f3a"), "the password is never printed: {said}");
    let said = refused(dir.path(), &with(good.clone(), "--cql-ca-file", &stranger));
    assert!(said.contains("certificate verify failed"), "CQL CA: {said}");

    // A password file other users can read is refused, as a tokens file is.
    let exposed = secret_file(dir.path(), "exposed", &secure.kafka_password);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let said = refused(dir.path(), &with(good, "--kafka-sasl-password-file", &exposed));
    assert!(said.contains("chmod 600"), "an exposed password file: {said}");
}

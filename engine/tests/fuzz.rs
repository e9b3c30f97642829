//! schemathesis, a client nobody here wrote, fuzzes the API from its own OpenAPI document:
//! no answer may be a 5xx, and every answer must match its documented status, content
//! type, headers and schema. Bounded to a few minutes; it prints the seed to rerun one.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, TOKEN};

/// No 5xx, and every answer as documented: status, content type, headers and body.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance";

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let Some(bin) = common::tool("SCHEMATHESIS") else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-run-quantity", "100", "--shopify-secret", "fuzz-secret"]).await;
    let report = dir.path().join("schemathesis.txt");
    let mut child = Command::new(&bin)
        .args(["run", &s.url("/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        // Reset would empty the store mid-run; uploads are Wasm bytes, which it cannot make.
        .args(["--exclude-path", "/reset", "--exclude-path", "/plugins/{slot}"])
        .args(["--exclude-path", "/plugins/{slot}/replay"])
        .args(["--max-examples", "30", "--no-color"])
        .args(["--checks", CHECKS])
        // A file, not a pipe: a long report must not block the fuzzer on a full pipe.
        .stdout(std::fs::File::create(&report).unwrap())
        .spawn()
        .unwrap();
    // At most three minutes, as the issue allows.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("schemathesis ran past three minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = std::fs::read_to_string(&report).unwrap();
    let summary = out.lines().filter(|l| l.contains("generated") || l.starts_with("Seed")).collect::<Vec<_>>();
    eprintln!("schemathesis: {}", summary.join("; "));
    assert!(status.success(), "schemathesis found problems:\n{out}");
    assert!(out.contains("generated") && !out.contains(" 0 generated"), "it tested something:\n{out}");
}

//! The CQL store against a real Cassandra 5 (the CQL stand-in for ScyllaDB): the same
//! behaviour as the embedded store, checked by the same conformance code.

mod common;

use common::{service, unique};
use orchestrator::store::cql::CqlStore;
use orchestrator::store::{Orders, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_conforms() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let config = common::cql_config(&nodes, &unique("conf"));
    let store = CqlStore::open(config.clone()).await.unwrap();
    conformance::check(&store, "c").await;
    // Reopening applies the schema again without harm, and sees the same rows.
    let again = CqlStore::open(config).await.unwrap();
    assert_eq!(again.get("c-a").await.unwrap().unwrap().version, 2);
    assert_eq!(again.history("c-a", 100, None).await.unwrap().items.len(), 3);
}

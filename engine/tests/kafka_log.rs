//! The Kafka log against a real broker: per-key order within a priority, commits after
//! processing, redelivery after a rewind and to the next group member, and lag.

mod common;

use std::time::{Duration, Instant};

use common::{service, unique};
use orchestrator::domain::Priority;
use orchestrator::log::kafka::{KafkaConfig, KafkaLog};
use orchestrator::log::{Delivery, LogConsumer, OrderLog, Record};

fn rec(p: Priority, key: &str, body: &str) -> Record {
    Record::new(p, key, body.as_bytes().to_vec())
}

/// Polls until `n` records of `p` arrived (or panics after 30 s).
async fn take(c: &mut Box<dyn LogConsumer>, p: Priority, n: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} {p:?} records arrived", got.len());
        got.extend(c.poll(p, n - got.len()).await.unwrap());
    }
    got
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(|d| String::from_utf8_lossy(&d.payload).into_owned()).collect()
}

fn config(brokers: String) -> KafkaConfig {
    common::kafka_config(brokers, &unique("t"), 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_log_orders_commits_and_redelivers() {
    let Some(brokers) = service("KAFKA_BROKERS") else { return };
    let log = KafkaLog::open(config(brokers)).await.unwrap();
    let normal: Vec<Record> =
        (0..30).map(|i| rec(Priority::Normal, &format!("k{}", i % 3), &format!("n{i}"))).collect();
    log.append(normal).await.unwrap();
    log.append(vec![rec(Priority::Vip, "k9", "v0")]).await.unwrap();

    let mut c = log.consumer().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.waiting(Priority::Vip) == 0 {
        assert!(Instant::now() < deadline, "the VIP record was never seen waiting");
        c.wait(Duration::from_millis(100)).await;
    }
    let vip = take(&mut c, Priority::Vip, 1).await;
    assert_eq!(bodies(&vip), ["v0"]);
    c.commit(&vip).await.unwrap();

    let first = take(&mut c, Priority::Normal, 30).await;
    // Each key keeps its order.
    for k in 0..3 {
        let of_key: Vec<usize> = first
            .iter()
            .filter(|d| d.key == format!("k{k}"))
            .map(|d| bodies(std::slice::from_ref(d))[0][1..].parse().unwrap())
            .collect();
        assert!(of_key.windows(2).all(|w| w[0] < w[1]), "key k{k} out of order: {of_key:?}");
        assert_eq!(of_key.len(), 10);
    }
    // Commit a third per partition, then rewind: the rest comes again.
    let mut committed = Vec::new();
    let mut rest = Vec::new();
    for part in 0..3 {
        let mine: Vec<Delivery> = first.iter().filter(|d| d.partition == part).cloned().collect();
        let cut = mine.len() / 3;
        committed.extend_from_slice(&mine[..cut]);
        rest.extend_from_slice(&mine[cut..]);
    }
    c.commit(&committed).await.unwrap();
    c.rewind(Priority::Normal);
    let mut again = bodies(&take(&mut c, Priority::Normal, rest.len()).await);
    let mut expected = bodies(&rest);
    again.sort();
    expected.sort();
    assert_eq!(again, expected, "everything not committed is redelivered after a rewind");
    drop(c);

    // The next member of the group starts where the commits left off.
    let mut next = log.consumer().await.unwrap();
    let mut got = bodies(&take(&mut next, Priority::Normal, rest.len()).await);
    got.sort();
    assert_eq!(got, expected);
    next.commit(&[]).await.unwrap();

    // Lag: what is not committed, per priority. It also counts the commit marker that
    // each partition's transaction left after the uncommitted records.
    let deadline = Instant::now() + Duration::from_secs(20);
    let expected = rest.len() as u64..=rest.len() as u64 + 3;
    while !expected.contains(&log.depth(Priority::Normal)) || log.depth(Priority::Vip) != 0 {
        assert!(
            Instant::now() < deadline,
            "lag normal {} vip {}",
            log.depth(Priority::Normal),
            log.depth(Priority::Vip)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log.problem(), None);
}

/// A request is on the log whole or not at all: one record the broker refuses (over its
/// 1 MB message limit) fails the append, and the request's other record never reaches a
/// consumer. Once everything is committed, the lag reads zero (commit markers included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_leaves_nothing_on_the_log() {
    let Some(brokers) = service("KAFKA_BROKERS") else { return };
    let log = KafkaLog::open(config(brokers)).await.unwrap();
    let huge = "x".repeat(2 * 1024 * 1024);
    let failed = log.append(vec![rec(Priority::Normal, "a", "first"), rec(Priority::Normal, "b", &huge)]).await;
    assert!(failed.is_err(), "the broker took a 2 MB record");
    log.append(vec![rec(Priority::Normal, "a", "after")]).await.unwrap();

    let mut c = log.consumer().await.unwrap();
    let mut got = take(&mut c, Priority::Normal, 1).await;
    let quiet = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet {
        got.extend(c.poll(Priority::Normal, 10).await.unwrap());
    }
    assert_eq!(bodies(&got), ["after"], "only the request that was acknowledged is on the log");
    c.commit(&got).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.depth(Priority::Normal) != 0 {
        assert!(Instant::now() < deadline, "the lag stays at {}", log.depth(Priority::Normal));
        c.wait(Duration::from_millis(100)).await;
    }
}

/// A crash leaves the instance's transaction open, and readers (who read committed) wait
/// behind it until the broker gives up on it. The same instance, restarted, fences its
/// earlier self at once: the open transaction is aborted and what follows is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_aborts_the_transaction_its_crash_left_open() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let Some(brokers) = service("KAFKA_BROKERS") else { return };
    let config = common::kafka_config(brokers.clone(), &unique("fence"), 1);
    let instance = "instance-under-test";
    let log = KafkaLog::open_as(config.clone(), instance).await.unwrap();
    log.append(vec![rec(Priority::Normal, "k", "before")]).await.unwrap();
    drop(log);

    // The crash: the instance's transaction is open, with a record in it, and the
    // broker would wait 10 minutes before aborting it.
    let crashed: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("transactional.id", config.transactional_id(instance))
        .set("transaction.timeout.ms", "600000")
        .create()
        .unwrap();
    crashed.init_transactions(Duration::from_secs(30)).unwrap();
    crashed.begin_transaction().unwrap();
    crashed.send(BaseRecord::to(&config.normal_topic).key("k").payload("never committed")).unwrap();
    crashed.flush(Duration::from_secs(30)).unwrap();
    std::mem::forget(crashed);

    // The restart, which appends nothing itself. Another instance's record after the
    // crash is read (within `take`'s 30 s, not the crashed transaction's 10 minutes);
    // the open one never is.
    let restarted = KafkaLog::open_as(config.clone(), instance).await.unwrap();
    let other = KafkaLog::open(config.clone()).await.unwrap();
    other.append(vec![rec(Priority::Normal, "k", "after")]).await.unwrap();
    let mut c = restarted.consumer().await.unwrap();
    assert_eq!(bodies(&take(&mut c, Priority::Normal, 2).await), ["before", "after"]);
}

/// Two instances append the first records of the same orders at once, one asking for
/// VIP and the other for NORMAL. Each order's records must still go to one partition,
/// so that they are consumed in order. Routes were plain writes (the later won, after
/// both instances had sent records their own way); now the first claim wins for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_on_new_orders_send_each_order_one_way() {
    let Some(brokers) = service("KAFKA_BROKERS") else { return };
    let Some(nodes) = service("CQL_NODES") else { return };
    let name = unique("race");
    let config = common::kafka_config(brokers, &name, 2);
    let book =
        std::sync::Arc::new(orchestrator::store::cql::CqlStore::open(common::cql_config(&nodes, &name)).await.unwrap());
    let (a, b) = (KafkaLog::open_as(config.clone(), "a").await.unwrap(), KafkaLog::open_as(config, "b").await.unwrap());
    a.set_route_book(book.clone());
    b.set_route_book(book);
    const ORDERS: usize = 100;
    let batch = |p: Priority, tag: &str| -> Vec<Record> {
        (0..ORDERS).map(|i| rec(p, &format!("o{i}"), &format!("{tag}{i}"))).collect()
    };
    let (va, nb) = tokio::join!(a.append(batch(Priority::Vip, "a")), b.append(batch(Priority::Normal, "b")));
    let (va, nb) = (va.unwrap(), nb.unwrap());
    assert_eq!(va[Priority::Vip] + va[Priority::Normal] + nb[Priority::Vip] + nb[Priority::Normal], 2 * ORDERS as u64);

    let mut c = a.consumer().await.unwrap();
    let vip = take(&mut c, Priority::Vip, (va[Priority::Vip] + nb[Priority::Vip]) as usize).await;
    // NORMAL is fetched once nothing of VIP is left uncommitted.
    c.commit(&vip).await.unwrap();
    let normal = take(&mut c, Priority::Normal, (va[Priority::Normal] + nb[Priority::Normal]) as usize).await;
    let split: Vec<&String> = vip.iter().map(|d| &d.key).filter(|k| normal.iter().any(|d| &d.key == *k)).collect();
    assert!(split.is_empty(), "{} orders have records in both priorities: {split:?}", split.len());
}

/// A route book that counts the keys whose routes are read.
struct CountingBook {
    inner: std::sync::Arc<orchestrator::store::cql::CqlStore>,
    reads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl orchestrator::log::RouteBook for CountingBook {
    async fn routes(
        &self,
        keys: Vec<String>,
    ) -> Result<std::collections::HashMap<String, Priority>, orchestrator::log::LogError> {
        self.reads.fetch_add(keys.len(), std::sync::atomic::Ordering::Relaxed);
        self.inner.routes(keys).await
    }
    async fn claim_routes(
        &self,
        routes: Vec<(String, Priority)>,
    ) -> Result<std::collections::HashMap<String, Priority>, orchestrator::log::LogError> {
        self.inner.claim_routes(routes).await
    }
    async fn set_routes(&self, routes: Vec<(String, Priority)>) -> Result<(), orchestrator::log::LogError> {
        self.inner.set_routes(routes).await
    }
}

/// Appending an order's create read its key's route before claiming one: a read per
/// new order, which the claim answers anyway. Creates now claim without it, and a
/// create whose key has a route still follows that route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_claims_its_route_without_reading_it_first() {
    use orchestrator::log::RouteBook as _;
    let Some(brokers) = service("KAFKA_BROKERS") else { return };
    let Some(nodes) = service("CQL_NODES") else { return };
    let name = unique("creates");
    let store = orchestrator::store::cql::CqlStore::open(common::cql_config(&nodes, &name)).await.unwrap();
    let book = std::sync::Arc::new(CountingBook { inner: std::sync::Arc::new(store), reads: Default::default() });
    let log = KafkaLog::open(common::kafka_config(brokers, &name, 2)).await.unwrap();
    log.set_route_book(book.clone());
    let reads = || book.reads.load(std::sync::atomic::Ordering::Relaxed);
    let create = |p: Priority, key: &str| Record { creates: true, ..rec(p, key, "created") };

    // Not a create: its route is read (there is none), then claimed.
    log.append(vec![rec(Priority::Normal, "old", "updated")]).await.unwrap();
    assert_eq!(reads(), 1);
    let new: Vec<Record> = (0..10).map(|i| create(Priority::Vip, &format!("new{i}"))).collect();
    let routed = log.append(new).await.unwrap();
    assert_eq!((routed[Priority::Vip], reads()), (10, 1), "ten creates, and no route read");
    // A create of an order that has a route: the claim loses and the record goes its way.
    let routed = log.append(vec![create(Priority::Vip, "old")]).await.unwrap();
    assert_eq!((routed[Priority::Vip], routed[Priority::Normal]), (0, 1), "the create follows the route");
    // A sole producer's route is set, not claimed: it reads first, so that it follows a
    // route another producer claimed rather than overwriting it.
    let sole = Record { sole_producer: true, ..create(Priority::Vip, "old") };
    let routed = log.append(vec![sole]).await.unwrap();
    assert_eq!((routed[Priority::Vip], routed[Priority::Normal]), (0, 1), "the sole producer follows the route");
    let held = book.inner.routes(vec!["old".into(), "new3".into()]).await.unwrap();
    assert_eq!((held["old"], held["new3"]), (Priority::Normal, Priority::Vip));
}

//! Per-series detector state in Redis (`[detector.redis_state]`): versioned writes, so a
//! stale replica never overwrites newer state, and series whose lookup failed are saved once
//! they were looked up again.
//!
//! `#[ignore]`d (they need Redis on 127.0.0.1:6379, `SMARTCLOUDOPS_REDIS_URL` overrides it):
//! `cargo test -p smartcloudops-core --features kafka,redis,sql --test redis_state -- --ignored`

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::AsyncCommands;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::detector::{
    EwmaConfig, EwmaDetector, RedisStateStore, RedisStateStoreConfig, SeriesStateStore,
    SeriesStates,
};
use smartcloudops_core::redis::RedisConnection;
use smartcloudops_core::{Detector, Pipeline, Result};

fn connection() -> RedisConnection {
    RedisConnection::new(
        std::env::var("SMARTCLOUDOPS_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    )
}

async fn raw() -> redis::aio::MultiplexedConnection {
    connection()
        .connect()
        .await
        .expect("Redis on 127.0.0.1:6379 (scripts/redis.sh start)")
}

fn config() -> RedisStateStoreConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    RedisStateStoreConfig {
        key_prefix: format!("sco-test:state:{}-{nanos}", std::process::id()),
        ttl: Duration::from_secs(600),
        ..RedisStateStoreConfig::default()
    }
}

async fn stored(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    con.get(key).await.unwrap()
}

const NS: &str = "v1:test:0";

#[tokio::test]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_stale_writer_never_overwrites_newer_state_and_is_told_to_reload() {
    let config = config();
    let (a, b) = (
        RedisStateStore::new(&config, connection()),
        RedisStateStore::new(&config, connection()),
    );
    let mut con = raw().await;
    let (key, version) = (a.key(NS, 7), a.version_key(NS, 7));

    assert!(a.load(NS, &[7]).await.unwrap().is_empty());
    a.save(NS, &[(7, b"a1".to_vec())]).await.unwrap();
    assert!(a.take_rejected(NS).is_empty());
    assert_eq!(stored(&mut con, &key).await.as_deref(), Some(&b"a1"[..]));

    // The series moves to replica b, which loads and moves it on.
    assert_eq!(b.load(NS, &[7]).await.unwrap(), vec![(7, b"a1".to_vec())]);
    b.save(NS, &[(7, b"b2".to_vec())]).await.unwrap();
    b.save(NS, &[(7, b"b3".to_vec())]).await.unwrap();
    assert!(b.take_rejected(NS).is_empty());

    // a still holds its old state: its write is refused, counted and reported once.
    a.save(NS, &[(7, b"a-stale".to_vec()), (8, b"a-new".to_vec())])
        .await
        .unwrap();
    assert_eq!(stored(&mut con, &key).await.as_deref(), Some(&b"b3"[..]));
    assert_eq!(a.take_rejected(NS), vec![7]);
    assert!(a.take_rejected(NS).is_empty());
    assert_eq!(a.rejected_writes(), 1);
    assert_eq!(
        stored(&mut con, &a.key(NS, 8)).await.as_deref(),
        Some(&b"a-new"[..]),
        "the other series of the chunk were written"
    );
    // Until it reloads, it stays refused.
    a.save(NS, &[(7, b"a-stale".to_vec())]).await.unwrap();
    assert_eq!(a.take_rejected(NS), vec![7]);

    // After a reload its writes go through again.
    assert_eq!(a.load(NS, &[7]).await.unwrap(), vec![(7, b"b3".to_vec())]);
    a.save(NS, &[(7, b"a4".to_vec())]).await.unwrap();
    assert!(a.take_rejected(NS).is_empty());
    assert_eq!(stored(&mut con, &key).await.as_deref(), Some(&b"a4"[..]));
    let v: i64 = con.get(&version).await.unwrap();
    assert_eq!(v, 4, "one version per write");
    let ttl: i64 = con.ttl(&version).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 600,
        "the version expires with its state: {ttl}"
    );
}

#[tokio::test]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn states_written_before_versions_load_and_are_replaced() {
    let config = config();
    let store = RedisStateStore::new(&config, connection());
    let mut con = raw().await;
    let key = store.key(NS, 1);
    let _: () = con.set(&key, b"unversioned".to_vec()).await.unwrap();

    // A replica that never loaded it must not overwrite it ...
    store.save(NS, &[(1, b"fresh".to_vec())]).await.unwrap();
    assert_eq!(store.take_rejected(NS), vec![1]);
    assert_eq!(
        stored(&mut con, &key).await.as_deref(),
        Some(&b"unversioned"[..])
    );
    // ... one that loaded it replaces it, and versions it from then on.
    assert_eq!(
        store.load(NS, &[1]).await.unwrap(),
        vec![(1, b"unversioned".to_vec())]
    );
    store.save(NS, &[(1, b"next".to_vec())]).await.unwrap();
    assert!(store.take_rejected(NS).is_empty());
    assert_eq!(stored(&mut con, &key).await.as_deref(), Some(&b"next"[..]));
    let v: i64 = con.get(store.version_key(NS, 1)).await.unwrap();
    assert_eq!(v, 1);
}

/// A Redis store whose first `fail_loads` lookups fail (Redis unreachable, say), and whose
/// first save is preceded by another replica's write of `interfere`.
#[derive(Debug)]
struct TestStore {
    inner: RedisStateStore,
    fail_loads: AtomicUsize,
    loads: Mutex<Vec<Vec<u64>>>,
    interfere: Mutex<Option<(RedisStateStore, u64, Vec<u8>)>>,
}

impl TestStore {
    fn new(config: &RedisStateStoreConfig, fail_loads: usize) -> Self {
        Self {
            inner: RedisStateStore::new(config, connection()),
            fail_loads: AtomicUsize::new(fail_loads),
            loads: Mutex::default(),
            interfere: Mutex::default(),
        }
    }

    fn loaded(&self) -> Vec<Vec<u64>> {
        self.loads.lock().unwrap().clone()
    }
}

impl SeriesStateStore for TestStore {
    fn name(&self) -> &str {
        "test"
    }

    fn load<'a>(
        &'a self,
        namespace: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<SeriesStates>> {
        self.loads.lock().unwrap().push(ids.to_vec());
        let fail = self
            .fail_loads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async {
                Err(smartcloudops_core::Error::Connector {
                    connector: "test".into(),
                    message: "injected lookup failure".into(),
                })
            });
        }
        self.inner.load(namespace, ids)
    }

    fn save<'a>(
        &'a self,
        namespace: &'a str,
        states: &'a [(u64, Vec<u8>)],
    ) -> BoxFuture<'a, Result<()>> {
        let interfere = self.interfere.lock().unwrap().take();
        Box::pin(async move {
            if let Some((other, id, state)) = interfere {
                other.load(namespace, &[id]).await?;
                other.save(namespace, &[(id, state)]).await?;
                assert!(other.take_rejected(namespace).is_empty());
            }
            self.inner.save(namespace, states).await
        })
    }

    fn take_rejected(&self, namespace: &str) -> Vec<u64> {
        self.inner.take_rejected(namespace)
    }

    fn rejected_writes(&self) -> u64 {
        self.inner.rejected_writes()
    }
}

/// The series id of host `h{host}` in [`common::numbered_batch`].
fn series_id(host: usize) -> u64 {
    smartcloudops_core::schema::MetricsColumns::try_new(&common::numbered_batch(0, host + 1), "t")
        .unwrap()
        .series_id
        .value(host)
}

/// The exported state of every series after `batches` numbered batches of 10 rows.
fn states_after(batches: usize) -> SeriesStates {
    let mut d = EwmaDetector::new(EwmaConfig::default());
    for i in 0..batches {
        d.score(&common::numbered_batch(i, 10)).unwrap();
    }
    d.export_changed_series().unwrap()
}

fn gauge(report: &smartcloudops_core::RunReport, name: &str) -> Option<f64> {
    report
        .metrics
        .stage("detector:ewma")
        .unwrap()
        .gauges
        .iter()
        .find(|g| g.name == name)
        .map(|g| g.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn series_whose_lookup_failed_are_looked_up_again_and_saved() {
    let config = config();
    // Another replica stored the state of one series (h0) earlier.
    let namespace = EwmaDetector::new(EwmaConfig::default())
        .series_state_namespace()
        .unwrap();
    let h0 = series_id(0);
    let h0_state = states_after(3)
        .into_iter()
        .find(|(id, _)| *id == h0)
        .unwrap()
        .1;
    let other = RedisStateStore::new(&config, connection());
    other
        .save(&namespace, &[(h0, h0_state.clone())])
        .await
        .unwrap();
    assert!(other.take_rejected(&namespace).is_empty());

    // This replica's first lookup fails: every series starts fresh.
    let store = Arc::new(TestStore::new(&config, 1));
    let log = common::Log::default();
    let report = Pipeline::builder(common::TestSource::new(Some(20), log))
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(Arc::new(MemoryAction::new().every_batch()))
        // Only the save at the end: the lookups are retried then.
        .series_state_store(store.clone(), Duration::from_secs(3600))
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let loads = store.loaded();
    assert!(loads.len() >= 2, "the failed lookup was retried: {loads:?}");
    assert!(loads[1].contains(&h0));

    let mut con = raw().await;
    let keys: Vec<String> = con
        .keys(format!("{}:state:{namespace}:*", config.key_prefix))
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        10,
        "the series whose lookup failed were saved once looked up again"
    );
    assert_eq!(
        stored(&mut con, &other.key(&namespace, h0)).await,
        Some(h0_state),
        "the stored state replaced the fresh one instead of being overwritten by it"
    );
    assert_eq!(gauge(&report, "detector_states_loaded_total"), Some(1.0));
    assert_eq!(
        gauge(&report, "detector_state_writes_rejected_total"),
        Some(0.0)
    );
    let _: () = con.del(&keys).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_refused_write_drops_the_stale_state_and_the_next_batch_loads_the_stored_one() {
    let config = config();
    let namespace = EwmaDetector::new(EwmaConfig::default())
        .series_state_namespace()
        .unwrap();
    let h3 = series_id(3);
    // Before this replica's first save, another one stores a newer state of h3 (its
    // partition moved there and back, say).
    let newer = states_after(50)
        .into_iter()
        .find(|(id, _)| *id == h3)
        .unwrap()
        .1;
    let store = Arc::new(TestStore::new(&config, 0));
    *store.interfere.lock().unwrap() = Some((
        RedisStateStore::new(&config, connection()),
        h3,
        newer.clone(),
    ));
    let log = common::Log::default();
    let report = Pipeline::builder(common::TestSource::new(Some(20), log))
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(Arc::new(MemoryAction::new().every_batch()))
        .series_state_store(store.clone(), Duration::from_millis(1))
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let loads = store.loaded();
    assert_eq!(loads[0].len(), 10, "the first batch looked every series up");
    assert!(
        loads[1..].iter().any(|ids| ids == &vec![h3]),
        "the refused series was looked up again: {loads:?}"
    );
    assert_eq!(
        gauge(&report, "detector_state_writes_rejected_total"),
        Some(1.0)
    );
    assert_eq!(
        gauge(&report, "detector_states_loaded_total"),
        Some(1.0),
        "the newer state was installed"
    );
    // From then on the replica continues the newer state, and its writes go through.
    let mut con = raw().await;
    let version: i64 = con
        .get(store.inner.version_key(&namespace, h3))
        .await
        .unwrap();
    assert!(
        version > 1,
        "saved again after the reload (version {version})"
    );
    let now = stored(&mut con, &store.inner.key(&namespace, h3))
        .await
        .unwrap();
    assert_ne!(now, newer, "it learned on from the stored state");
}

//! The PostgreSQL backend against a throwaway cluster (initdb + pg_ctl from
//! /usr/lib/postgresql/*/bin, run as the `postgres` user when we are root, data and socket in a
//! temp dir, a free port, listening on the unix socket only). Skips, saying why, only when no
//! PostgreSQL binaries are installed.

use std::collections::BTreeSet;
use std::sync::Arc;

use keel_store::conformance::{self, Backend};
use keel_store::{PgStore, Store, StoreError, StoreFuture};

const ME: &str = "node1.server1-bus1";
const UUID: &str = "6f1c2a7e-0000-4000-8000-000000000001";

use keel_testkit::pgtest::{pg_bin, Cluster};

struct PgBackend {
    url: String,
}

fn schema_of(name: &str) -> String {
    format!("keel_{}", name.replace('-', "_"))
}

impl Backend for PgBackend {
    fn create<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>> {
        Box::pin(async move {
            PgStore::create(&self.url, &schema_of(name), me, uuid)
                .await
                .map(|s| Box::new(s) as Box<dyn Store>)
        })
    }
    fn open<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>> {
        Box::pin(async move {
            PgStore::open(&self.url, &schema_of(name), me, uuid)
                .await
                .map(|s| Box::new(s) as Box<dyn Store>)
        })
    }
}

/// Everything against one cluster (starting one takes seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_backend() {
    let Some(bin) = pg_bin() else {
        println!("SKIPPED postgres_backend: no PostgreSQL binaries under /usr/lib/postgresql/*/bin (install the postgresql package to run it)");
        return;
    };
    let cluster = Cluster::start(bin);
    let b = PgBackend { url: cluster.url() };

    conformance::run_all(&b).await;
    for seed in 1..4 {
        conformance::model_check(
            &b,
            &format!("model{seed}"),
            &conformance::lcg_script(seed, 60),
        )
        .await;
    }
    group_commit_groups(&b).await;
    pg_specifics(&b).await;
}

async fn group_commit_groups(b: &PgBackend) {
    let store = Arc::new(
        PgStore::create(&b.url, "keel_group", ME, UUID)
            .await
            .unwrap(),
    );
    let before = store.transactions_committed();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.commit(vec![conformance::put("Q", 4, &i.to_le_bytes())])
                .await
                .unwrap()
        }));
    }
    let mut seqs = BTreeSet::new();
    for t in tasks {
        assert!(seqs.insert(t.await.unwrap().assigned_seqs[0]));
    }
    let txns = store.transactions_committed() - before;
    assert!(
        txns < 64,
        "64 commits took {txns} transactions: no grouping"
    );
    assert_eq!(store.depth("Q").await.unwrap(), 64);
    store.close().await.unwrap();
}

async fn pg_specifics(b: &PgBackend) {
    // One writer per store across processes: a second open is refused while the first runs.
    let s = PgStore::create(&b.url, "keel_inuse", ME, UUID)
        .await
        .unwrap();
    match PgStore::open(&b.url, "keel_inuse", ME, UUID).await {
        Err(StoreError::InUse { .. }) => {}
        Err(e) => panic!("wrong error for a store in use: {e}"),
        Ok(_) => panic!("a store in use opened twice"),
    }
    s.close().await.unwrap();
    drop(s);
    let s = PgStore::open(&b.url, "keel_inuse", ME, UUID)
        .await
        .expect("reopen after close");
    // The location names the database and schema, never a password.
    let info = s.info().await.unwrap();
    assert_eq!(info.backend, "postgresql");
    assert!(
        info.location.contains("schema=keel_inuse"),
        "{}",
        info.location
    );
    assert!(
        info.location.starts_with("postgresql://postgres@"),
        "{}",
        info.location
    );
    s.close().await.unwrap();
    // Refusals: existing store, missing store, bad schema name.
    assert!(matches!(
        PgStore::create(&b.url, "keel_inuse", ME, UUID).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        PgStore::open(&b.url, "keel_absent", ME, UUID).await,
        Err(StoreError::Missing { .. })
    ));
    assert!(matches!(
        PgStore::open(&b.url, "Robert'); DROP", ME, UUID).await,
        Err(StoreError::Invalid { .. })
    ));
    // A password in the URL never shows in the location or in errors.
    let url = format!("{} password=hunter2", b.url);
    let s = PgStore::open(&url, "keel_inuse", ME, UUID).await.unwrap();
    assert!(!s.info().await.unwrap().location.contains("hunter2"));
    s.close().await.unwrap();
}

/// A data store over TLS (`sslmode=verify-full&sslrootcert=FILE` in its URL) against a cluster
/// that takes TCP over TLS only: the conformance suite passes over it, and a URL trusting
/// another CA cannot open the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_over_verified_tls() {
    let Some(bin) = pg_bin() else {
        println!("SKIPPED a_store_over_verified_tls: no PostgreSQL binaries under /usr/lib/postgresql/*/bin");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keel_testkit::dbcerts::DbCerts {
        pki,
        other,
        cert_pem,
        key_pem,
    } = keel_testkit::dbcerts::db_certs(dir.path(), "pg");
    let cluster = Cluster::start_tls(bin, &cert_pem, &key_pem);
    let url = |ca: &std::path::Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            cluster.tcp_url(),
            ca.display()
        )
    };
    let b = PgBackend {
        url: url(&pki.ca_cert_path()),
    };
    conformance::run_all(&b).await;
    match PgStore::create(&url(&other.ca_cert_path()), "keel_tls_wrong", ME, UUID).await {
        Err(e) => assert!(e.to_string().contains("connect over TLS"), "{e}"),
        Ok(_) => panic!("a store opened trusting another CA"),
    }
}

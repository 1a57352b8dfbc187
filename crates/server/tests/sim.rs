//! Simulations of delivery streams over a simulated network (turmoil): two engines with real
//! data stores (SQLite in a temp directory) and the server's real link code
//! (`links::source_link`, `LinkAcceptor::serve`) on hosts `me1` and `me2`, with partitions,
//! host crashes (in-flight work lost, committed data kept), and stores restored from backups
//! followed by a FLUSH start. A driver sends numbered messages at me1 for queue q2 on me2;
//! the checker is DESIGN §5's oracle over what q2 holds at the end:
//! - every message accepted after the last FLUSH start arrives exactly once;
//! - every message accepted before a restored *source*'s backup arrives exactly once (resent
//!   from the backup, or delivered before and then recognised by the duplicate window);
//! - nothing arrives twice, nothing arrives that was not sent, and a message whose send failed
//!   ambiguously (a crash mid-commit) arrives at most once.
//!
//! `KEEL_SIM_SEEDS=N` runs N seeds per scenario (default 8, as CI runs them); a failure names
//! its seed. By hand: `KEEL_SIM_SEEDS=150 cargo test -p keel-server --test sim -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_config::{BusCfg, BusMember, Cell, Config, DestinationCfg, DestinationKind, InitialState};
use keel_engine::messaging::OutgoingMessage;
use keel_engine::{Engine, EngineConfig, StartMode};
use keel_server::links::{source_link, LinkAcceptor, Peer, Transport};
use rand::{Rng, SeedableRng};

const BUS: &str = "bus1";
const PORT: u16 = 7000;
const SECRET: &[u8] = b"simulation admin credential";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    /// Partitions and crashes of either host; no restore: everything exactly once.
    Faults,
    /// me1's store goes back to a backup and me1 is FLUSH-started.
    SourceRestored,
    /// me2's store goes back to a backup and me2 is FLUSH-started.
    TargetRestored,
}

struct Side {
    host: &'static str,
    me: String,
    uuid: String,
    store: PathBuf,
    /// The running engine, while the host runs.
    engine: Arc<Mutex<Option<Arc<Engine>>>>,
    mode: Arc<Mutex<StartMode>>,
}

fn member(host: &str, uuid: &str) -> BusMember {
    BusMember {
        node: format!("n{host}"),
        server: "s".into(),
        me: keel_config::me_name(&format!("n{host}"), "s", BUS),
        uuid: uuid.into(),
        initial_state: InitialState::Started,
        store_url: None,
    }
}

fn config(sides: &[&Side]) -> Config {
    let mut q2 = DestinationCfg::new("q2", DestinationKind::Queue, &sides[1].me);
    q2.max_failed_deliveries = 5;
    Config {
        version: 1,
        cell: Cell {
            name: "cell".into(),
        },
        nodes: sides
            .iter()
            .map(|s| keel_config::NodeCfg {
                name: format!("n{}", s.host),
                host: s.host.into(),
                admin_port: 9000,
                servers: vec![keel_config::ServerCfg {
                    name: "s".into(),
                    admin_port: 9001,
                    bus_port: PORT,
                    monitor: Default::default(),
                }],
            })
            .collect(),
        buses: vec![BusCfg {
            name: BUS.into(),
            members: sides.iter().map(|s| member(s.host, &s.uuid)).collect(),
            destinations: vec![q2],
            allow_anonymous: false,
            anonymous_user: None,
            max_message_bytes: 1 << 20,
            duplicate_window_hours: 168,
        }],
        datasources: Vec::new(),
        apps: Vec::new(),
        users: Vec::new(),
    }
}

fn engine_config(cfg: &Config, side: &Side) -> EngineConfig {
    let bus = &cfg.buses[0];
    EngineConfig {
        me: side.me.clone(),
        uuid: side.uuid.clone(),
        bus: BUS.into(),
        node: format!("n{}", side.host),
        server: "s".into(),
        store_path: side.store.clone(),
        destinations: bus.destinations.clone(),
        max_message_bytes: bus.max_message_bytes,
        store_url: None,
        peers: bus
            .members
            .iter()
            .filter(|m| m.me != side.me)
            .map(|m| (m.me.clone(), m.uuid.clone()))
            .collect(),
        duplicate_window_ms: 3_600_000,
    }
}

/// What a host runs: its engine (started in the side's mode, retried while a crashed
/// predecessor still holds the store), the link acceptor on PORT, and a link to the peer kept
/// up with a short back-off.
fn install(sim: &mut turmoil::Sim<'_>, cfg: &Config, side: &Side, peer: &Side) {
    let ecfg = engine_config(cfg, side);
    let cfg = cfg.clone();
    let slot = side.engine.clone();
    let mode = side.mode.clone();
    let peer = Peer {
        me: peer.me.clone(),
        uuid: peer.uuid.clone(),
        address: format!("{}:{PORT}", peer.host),
        node: "node01".into(),
        server: peer.host.to_string(),
    };
    let peer_host = peer_host(&peer);
    sim.host(side.host, move || {
        let (ecfg, cfg, slot, mode, peer, peer_host) = (
            ecfg.clone(),
            cfg.clone(),
            slot.clone(),
            mode.clone(),
            peer.clone(),
            peer_host.clone(),
        );
        async move {
            let engine = Engine::new(ecfg, false);
            let start_mode = *mode.lock().unwrap();
            // The crashed predecessor's store threads let go of the store's lock in real time
            // (they finish what was queued), so the bound is in real time too.
            let since = std::time::Instant::now();
            while let Err(e) = engine.start(start_mode).await {
                if since.elapsed() > Duration::from_secs(30) {
                    return Err(format!("engine does not start: {e}").into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A later bounce is a normal start (a pending flush continues).
            *mode.lock().unwrap() = StartMode::Normal;
            *slot.lock().unwrap() = Some(engine.clone());
            let acceptor = Arc::new(LinkAcceptor::new(
                &cfg,
                std::slice::from_ref(&engine),
                SECRET,
            ));
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
            let key = keel_bus::auth::link_key(SECRET, BUS);
            let linker = engine.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(s) =
                        turmoil::net::TcpStream::connect((peer_host.as_str(), PORT)).await
                    {
                        let r = source_link(&linker, &key, &peer, Transport::Plain, s).await;
                        if std::env::var_os("KEEL_SIM_LOG").is_some() {
                            println!("link {} -> {}: {r:?}", linker.config().me, peer.me);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            loop {
                let (s, from) = listener.accept().await?;
                let a = acceptor.clone();
                tokio::spawn(async move {
                    a.serve(s, &from.to_string(), Transport::Plain, &mut || Ok(()))
                        .await
                });
            }
        }
    });
}

fn peer_host(p: &Peer) -> String {
    p.address.split(':').next().unwrap().to_string()
}

fn numbered(n: u64) -> OutgoingMessage {
    OutgoingMessage {
        body: n.to_be_bytes().to_vec(),
        properties: Default::default(),
        priority: None,
        reliability: None,
        ttl_ms: None,
    }
}

/// What the driver saw.
#[derive(Default, Debug)]
struct Log {
    /// Accepted messages, with whether they were accepted after the last FLUSH start.
    accepted: Vec<u64>,
    ambiguous: Vec<u64>,
    /// Numbers below this were accepted before the source's backup.
    before_backup: Option<u64>,
    /// Numbers at or above this were sent after the last FLUSH start.
    after_flush: Option<u64>,
    /// What q2 held at the end.
    arrived: BTreeMap<u64, u32>,
}

fn run(seed: u64, scenario: Scenario) {
    let dir = tempfile::tempdir().unwrap();
    // KEEL_SIM_LOG=1: the engines' and links' log lines on stdout (one run at a time).
    if std::env::var_os("KEEL_SIM_LOG").is_some() {
        let layout = keel_core::Layout::new(dir.path());
        let _ = keel_logs::init_process(&layout, "sim", true);
    }
    let mk = |host: &'static str| Side {
        host,
        me: keel_config::me_name(&format!("n{host}"), "s", BUS),
        uuid: uuid::Uuid::new_v4().to_string(),
        store: dir.path().join(format!("{host}.sqlite")),
        engine: Arc::new(Mutex::new(None)),
        mode: Arc::new(Mutex::new(StartMode::Normal)),
    };
    let (me1, me2) = (mk("me1"), mk("me2"));
    let cfg = config(&[&me1, &me2]);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(30 * 24 * 3_600))
        // Small ticks: the stores do real I/O (milliseconds of fsync) while simulated time runs;
        // with 1 ms ticks a link's 5 s handshake bound passes during a few commits.
        .tick_duration(Duration::from_micros(100))
        .build_with_rng(Box::new(rand::rngs::SmallRng::seed_from_u64(seed)));
    install(&mut sim, &cfg, &me1, &me2);
    install(&mut sim, &cfg, &me2, &me1);
    let log = Arc::new(Mutex::new(Log::default()));
    const MESSAGES: u64 = 300;
    let (source, target) = (me1.engine.clone(), me2.engine.clone());
    let driver_log = log.clone();
    // Numbers the driver has sent so far (the fault schedule reads it).
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let driver_sent = sent.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver_done = done.clone();
    sim.client("driver", async move {
        for n in 0..MESSAGES {
            let engine = loop {
                if let Some(e) = source.lock().unwrap().clone() {
                    if let Ok(m) = e.messaging() {
                        break m;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            match engine.send_batch("q2", vec![numbered(n)]).await {
                Ok(r) if r[0].is_ok() => driver_log.lock().unwrap().accepted.push(n),
                _ => driver_log.lock().unwrap().ambiguous.push(n),
            }
            driver_sent.store(n + 1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        // Wait until nothing is pending anywhere, then read q2.
        while !driver_done.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // In real time: the stores do real I/O while simulated time runs ahead of it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = source.lock().unwrap().clone();
            let t = target.lock().unwrap().clone();
            if let (Some(s), Some(t)) = (s, t) {
                let idle = match (s.info().await, s.messaging(), t.messaging()) {
                    (Ok(i), Ok(sm), Ok(tm)) => {
                        i.messages == 0
                            && sm.flush_status().await.is_none()
                            && tm.flush_status().await.is_none()
                    }
                    _ => false,
                };
                if idle {
                    break;
                }
            }
            if std::time::Instant::now() > deadline {
                let s = source.lock().unwrap().clone();
                let t = target.lock().unwrap().clone();
                let mut why = String::new();
                for (name, e) in [("me1", s), ("me2", t)] {
                    match e {
                        None => why += &format!("{name} not running; "),
                        Some(e) => {
                            let info = e.info().await.map(|i| (i.messages, i.restore_state));
                            let flush = match e.messaging() {
                                Ok(m) => format!("{:?}", m.flush_status().await),
                                Err(e) => e.to_string(),
                            };
                            why += &format!("{name}: {:?} {:?} flush {flush}; ", e.state(), info);
                        }
                    }
                }
                return Err(format!("the transmission queue never drained: {why}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = target.lock().unwrap().clone().unwrap().messaging()?;
        loop {
            let got = t.receive_now("q2", 256).await?;
            if got.is_empty() {
                break;
            }
            let mut l = driver_log.lock().unwrap();
            for d in got {
                let n = u64::from_be_bytes(d.body[..8].try_into().unwrap());
                *l.arrived.entry(n).or_default() += 1;
            }
        }
        Ok(())
    });

    // The fault schedule, from the seed.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x5eed);
    let backup = dir.path().join("backup.sqlite");
    let restored = match scenario {
        Scenario::Faults => None,
        Scenario::SourceRestored => Some(&me1),
        Scenario::TargetRestored => Some(&me2),
    };
    let backup_at = rng.gen_range(40..120);
    let restore_at = rng.gen_range(150..240);
    let (mut backed_up, mut restored_done) = (false, false);
    let mut partitioned = false;
    let (mut stalls, mut crashes) = (0u32, 0u32);
    let mut steps: u64 = 0;
    loop {
        steps += 1;
        assert!(
            steps < 200_000_000,
            "seed {seed}: the simulation does not end"
        );
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => panic!("seed {seed} {scenario:?}: {e}"),
        }
        let n = sent.load(std::sync::atomic::Ordering::SeqCst);
        if n >= MESSAGES {
            if partitioned {
                sim.release("me1", "me2");
                partitioned = false;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            continue;
        }
        if !steps.is_multiple_of(50) {
            continue;
        }
        // Network stalls and crashes while the driver sends. A stall holds segments and
        // delivers them later, in order, as TCP does (turmoil's partition drops segments from
        // inside a stream, which TCP never does: it would end the connection instead).
        match rng.gen_range(0..100) {
            0..=2 if !partitioned => {
                sim.hold("me1", "me2");
                partitioned = true;
                stalls += 1;
            }
            3..=12 if partitioned => {
                sim.release("me1", "me2");
                partitioned = false;
            }
            13 if scenario == Scenario::Faults => {
                let side = if rng.gen_bool(0.5) { &me1 } else { &me2 };
                crash(&mut sim, side);
                sim.bounce(side.host);
                crashes += 1;
            }
            _ => {}
        }
        if let Some(side) = restored {
            if !backed_up && n >= backup_at {
                let store = side
                    .engine
                    .lock()
                    .unwrap()
                    .clone()
                    .and_then(|e| e.sqlite_store());
                if let Some(store) = store {
                    store.backup_to(&backup, &mut |_, _| {}).unwrap();
                    backed_up = true;
                    log.lock().unwrap().before_backup = Some(n);
                }
            }
            if backed_up && !restored_done && n >= restore_at {
                crash(&mut sim, side);
                restore(&mut sim, &backup, &side.store, side);
                *side.mode.lock().unwrap() = StartMode::Flush;
                // Message n may have been in flight at the crash (its commit can still land in
                // the old store and be answered): only those after it count as sent after the
                // FLUSH start.
                log.lock().unwrap().after_flush = Some(n + 1);
                sim.bounce(side.host);
                restored_done = true;
            }
        }
    }
    let log = log.lock().unwrap();
    eprintln!(
        "seed {seed} {scenario:?}: {} accepted, {} ambiguous, {} arrived; {stalls} network stalls, {crashes} crashes, backup at {:?}, flush from {:?}",
        log.accepted.len(),
        log.ambiguous.len(),
        log.arrived.len(),
        log.before_backup,
        log.after_flush
    );
    check(seed, scenario, &log);
}

/// Crashes a host: its software and in-flight work go; what its store committed stays.
fn crash(sim: &mut turmoil::Sim<'_>, side: &Side) {
    sim.crash(side.host);
    side.engine.lock().unwrap().take();
}

/// Puts `backup` in place of the store, once the crashed engine's store has let go of its
/// lock (a client may still hold the engine until it is next polled: the simulation steps).
fn restore(sim: &mut turmoil::Sim<'_>, backup: &Path, store: &Path, side: &Side) {
    let mut last = None;
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_secs(30) {
        match keel_store::restore_from(backup, store, &side.me, &side.uuid) {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        sim.step().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the store of {} could not be restored: {last:?}", side.me);
}

fn check(seed: u64, scenario: Scenario, log: &Log) {
    let ctx = format!("seed {seed} {scenario:?}");
    for (n, c) in &log.arrived {
        assert!(*c == 1, "{ctx}: message {n} arrived {c} times");
        assert!(
            log.accepted.contains(n) || log.ambiguous.contains(n),
            "{ctx}: message {n} arrived but was never sent"
        );
    }
    for n in &log.accepted {
        let must = match scenario {
            Scenario::Faults => true,
            // Lost with the restore only if accepted after the backup and before the flush.
            Scenario::SourceRestored => {
                *n < log.before_backup.unwrap_or(u64::MAX)
                    || *n >= log.after_flush.unwrap_or(u64::MAX)
            }
            // The target lost what it took after its backup; the source resends only what it
            // still held.
            Scenario::TargetRestored => *n >= log.after_flush.unwrap_or(u64::MAX),
        };
        if must {
            assert!(
                log.arrived.contains_key(n),
                "{ctx}: accepted message {n} was lost (backup at {:?}, flush at {:?})",
                log.before_backup,
                log.after_flush
            );
        }
    }
}

fn seeds() -> u64 {
    std::env::var("KEEL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

#[test]
fn streams_deliver_exactly_once_through_partitions_and_crashes() {
    for seed in 0..seeds() {
        run(seed, Scenario::Faults);
    }
}

#[test]
fn a_restored_source_flushes_without_loss_or_duplicates() {
    for seed in 0..seeds() {
        run(seed, Scenario::SourceRestored);
    }
}

#[test]
fn a_restored_target_flushes_without_loss_or_duplicates() {
    for seed in 0..seeds() {
        run(seed, Scenario::TargetRestored);
    }
}

use std::path::Path;

use super::*;
use crate::error::{ConfigError, Result};
use crate::paths::rel_app;

/// The config a fresh profile gets, built through the public API.
pub(crate) fn sample() -> Config {
    let mut c = Config {
        version: 1,
        cell: Cell {
            name: "keelCell".into(),
        },
        nodes: vec![NodeCfg {
            name: "node01".into(),
            host: "127.0.0.1".into(),
            admin_port: 7270,
            servers: vec![],
        }],
        buses: vec![],
        datasources: vec![],
        apps: vec![],
        users: vec![],
    };
    c.add_server("node01", "server1").expect("add server");
    c.add_bus_member("bus1", "server1").expect("add member");
    c
}

fn invalid_key(r: Result<()>) -> String {
    match r {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn sample_is_valid_and_has_documented_ports() {
    let c = sample();
    c.validate().expect("valid");
    let s = c.server("node01", "server1").expect("server1");
    assert_eq!((s.admin_port, s.bus_port), (7271, 7272));
    assert_eq!(s.monitor, MonitorPolicy::default());
    assert_eq!(c.buses[0].members[0].me, "node01.server1-bus1");
}

#[test]
fn names_follow_the_rule() {
    assert!(name_problem("server1").is_none());
    assert!(name_problem("a.b-c_d").is_none());
    assert!(name_problem("").is_some());
    assert!(name_problem("-x").is_some());
    assert!(name_problem(".x").is_some());
    assert!(name_problem("a b").is_some());
    assert!(name_problem("a/b").is_some());
    assert!(name_problem(&"a".repeat(64)).is_none());
    assert!(name_problem(&"a".repeat(65)).is_some());
}

#[test]
fn add_server_allocates_the_next_two_ports_cell_wide() {
    let mut c = sample();
    let s = c.add_server("node01", "server2").expect("add").clone();
    assert_eq!((s.admin_port, s.bus_port), (7273, 7274));
    // A port raised by hand moves the allocation above it.
    c.nodes[0].servers[0].bus_port = 9000;
    let s = c.add_server("node01", "server10").expect("add").clone();
    assert_eq!((s.admin_port, s.bus_port), (9001, 9002));
    let names: Vec<_> = c.nodes[0].servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["server1", "server2", "server10"]);
    c.validate().expect("valid");
}

#[test]
fn add_server_errors() {
    let mut c = sample();
    let e = c
        .add_server("node99", "s")
        .expect_err("unknown node")
        .to_string();
    assert!(e.contains("node99") && e.contains("node01"), "{e}");
    let e = c
        .add_server("node01", "server1")
        .expect_err("dup")
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = c
        .add_server("node01", "bad name")
        .expect_err("name")
        .to_string();
    assert!(e.contains("not a valid server name"), "{e}");
    assert!(c.add_server("node01", "nodeagent").is_err());
    c.nodes[0].admin_port = 65534;
    assert!(matches!(
        c.add_server("node01", "s9"),
        Err(ConfigError::PortsExhausted { .. })
    ));
}

#[test]
fn add_bus_member_creates_bus_and_refuses_twice() {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add");
    let m = c.add_bus_member("bus2", "server2").expect("member").clone();
    assert_eq!(m.me, "node01.server2-bus2");
    assert_eq!(m.initial_state, InitialState::Started);
    uuid::Uuid::parse_str(&m.uuid).expect("uuid");
    let m2 = c.add_bus_member("bus1", "server2").expect("member").clone();
    assert_ne!(m.uuid, m2.uuid);
    assert_eq!(
        c.buses.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["bus1", "bus2"]
    );
    assert_eq!(c.buses[0].members.len(), 2);
    assert!(matches!(
        c.add_bus_member("bus1", "server2"),
        Err(ConfigError::AlreadyMember { .. })
    ));
    let e = c
        .add_bus_member("bus1", "ghost")
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("ghost") && e.contains("server1"), "{e}");
    c.validate().expect("valid");
}

#[test]
fn validate_catches_each_rule() {
    let mut c = sample();
    c.nodes[0].servers[0].bus_port = 7270;
    assert_eq!(invalid_key(c.validate()), "server.bus_port");

    let mut c = sample();
    c.nodes[0].servers[0].admin_port = 80;
    let e = c.validate().expect_err("low port");
    assert!(
        e.to_string()
            .contains("nodes/node01/servers/server1.toml: key `server.admin_port` = 80 is invalid"),
        "{e}"
    );

    let mut c = sample();
    c.nodes[0].servers[0].monitor.ping_interval_s = 0;
    let e = c.validate().expect_err("ping").to_string();
    assert_eq!(
        e,
        "nodes/node01/servers/server1.toml: key `monitor.ping_interval_s` = 0 is invalid: must be between 1 and 3600; fix: set it to a number of seconds between 1 and 3600, then run `keel config validate`"
    );

    let mut c = sample();
    c.nodes[0].servers[0].monitor.max_start_attempts = 101;
    assert_eq!(invalid_key(c.validate()), "monitor.max_start_attempts");

    let mut c = sample();
    c.buses[0].members[0].me = "x".into();
    assert_eq!(invalid_key(c.validate()), "member[1].me");

    let mut c = sample();
    c.buses[0].members[0].uuid = "nope".into();
    assert_eq!(invalid_key(c.validate()), "member[1].uuid");

    let mut c = sample();
    c.buses[0].members[0].server = "ghost".into();
    assert_eq!(invalid_key(c.validate()), "member[1].server");

    let mut c = sample();
    let m = c.buses[0].members[0].clone();
    c.buses[0].members.push(BusMember {
        uuid: uuid::Uuid::new_v4().to_string(),
        ..m
    });
    assert_eq!(invalid_key(c.validate()), "member[2].server");

    let mut c = sample();
    c.nodes.clear();
    assert_eq!(invalid_key(c.validate()), "node");

    let mut c = sample();
    c.version = 0;
    assert_eq!(invalid_key(c.validate()), "repository.version");

    let mut c = sample();
    c.cell.name = "bad/cell".into();
    assert_eq!(invalid_key(c.validate()), "cell.name");

    let mut c = sample();
    c.nodes[0].host = String::new();
    assert_eq!(invalid_key(c.validate()), "node.host");
}

/// `sample` plus server2 as a second member of bus1, and a queue and a topic on bus1.
pub(crate) fn sample_with_destinations() -> Config {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add server");
    c.add_bus_member("bus1", "server2").expect("add member");
    c.add_destination(
        "bus1",
        "orders",
        DestinationKind::Queue,
        Some("node01.server1-bus1"),
        None,
    )
    .expect("queue");
    c.add_destination(
        "bus1",
        "prices",
        DestinationKind::Topic,
        Some("node01.server2-bus1"),
        Some(Reliability::Express),
    )
    .expect("topic");
    c.add_destination(
        "bus1",
        "orders.dead",
        DestinationKind::Queue,
        Some("node01.server2-bus1"),
        None,
    )
    .expect("queue");
    let d = &mut c.buses[0].destinations;
    let orders = d.iter_mut().find(|d| d.name == "orders").expect("orders");
    orders.exception_destination = Some("orders.dead".into());
    orders.default_priority = 7;
    orders.max_failed_deliveries = 3;
    c.buses[0].allow_anonymous = true;
    c.buses[0].max_message_bytes = 4096;
    c.validate().expect("valid");
    c
}

#[test]
fn remove_destination_takes_it_out_and_validation_guards_its_users() {
    let mut c = sample_with_destinations();
    let d = c.remove_destination("bus1", "prices").expect("remove");
    assert_eq!(d.kind, DestinationKind::Topic);
    assert!(c.find_destination("bus1", "prices").is_none());
    c.validate().expect("nothing names prices");
    match c.remove_destination("bus1", "prices") {
        Err(ConfigError::UnknownDestination { known, .. }) => {
            assert_eq!(known, ["orders", "orders.dead"])
        }
        other => panic!("expected UnknownDestination, got {other:?}"),
    }
    assert!(matches!(
        c.remove_destination("nobus", "orders"),
        Err(ConfigError::UnknownBus { .. })
    ));
    // orders.dead is the exception destination of orders: the save would be refused.
    c.remove_destination("bus1", "orders.dead").expect("remove");
    assert!(c.validate().is_err());
}

#[test]
fn reliability_is_ordered_and_spelled_as_documented() {
    use std::str::FromStr;
    let words = [
        "best_effort",
        "express",
        "reliable_persistent",
        "assured_persistent",
    ];
    for (i, r) in Reliability::ALL.iter().enumerate() {
        assert_eq!(r.as_str(), words[i]);
        assert_eq!(r.to_string(), words[i]);
        assert_eq!(Reliability::from_str(words[i]).expect("parse"), *r);
        assert_eq!(
            toml::Value::try_from(*r).expect("ser"),
            toml::Value::String(words[i].into())
        );
    }
    assert!(Reliability::BestEffort < Reliability::Express);
    assert!(Reliability::Express < Reliability::ReliablePersistent);
    assert!(Reliability::ReliablePersistent < Reliability::AssuredPersistent);
    assert!(!Reliability::Express.is_persistent());
    assert!(Reliability::ReliablePersistent.is_persistent());
    let e = "assured"
        .parse::<Reliability>()
        .expect_err("bad")
        .to_string();
    for w in words {
        assert!(e.contains(w), "{e}");
    }
    assert!(e.contains("\"assured\""), "{e}");

    assert_eq!(
        "queue".parse::<DestinationKind>().expect("q"),
        DestinationKind::Queue
    );
    assert_eq!(
        "topic".parse::<DestinationKind>().expect("t"),
        DestinationKind::Topic
    );
    assert_eq!(DestinationKind::Topic.as_str(), "topic");
    let e = "Queue"
        .parse::<DestinationKind>()
        .expect_err("bad")
        .to_string();
    assert!(e.contains("queue") && e.contains("topic"), "{e}");
    assert_eq!(
        toml::Value::try_from(DestinationKind::Queue).expect("ser"),
        toml::Value::String("queue".into())
    );
}

#[test]
fn add_destination_defaults_to_the_only_member() {
    let mut c = sample();
    let d = c
        .add_destination("bus1", "q1", DestinationKind::Queue, None, None)
        .expect("add")
        .clone();
    assert_eq!(
        d,
        DestinationCfg {
            name: "q1".into(),
            kind: DestinationKind::Queue,
            me: "node01.server1-bus1".into(),
            reliability: Reliability::AssuredPersistent,
            default_reliability: Reliability::ReliablePersistent,
            default_priority: 4,
            max_failed_deliveries: 5,
            exception_destination: None,
        }
    );
    assert_eq!(
        d.exception_target(),
        "_SYSTEM.Exception.Destination.node01.server1-bus1"
    );
    // The default reliability is capped at the maximum.
    let d = c
        .add_destination(
            "bus1",
            "t1",
            DestinationKind::Topic,
            None,
            Some(Reliability::Express),
        )
        .expect("add")
        .clone();
    assert_eq!(
        (d.reliability, d.default_reliability),
        (Reliability::Express, Reliability::Express)
    );
    let d = c
        .add_destination(
            "bus1",
            "q10",
            DestinationKind::Queue,
            Some("node01.server1-bus1"),
            Some(Reliability::ReliablePersistent),
        )
        .expect("add")
        .clone();
    assert_eq!(d.default_reliability, Reliability::ReliablePersistent);
    c.add_destination("bus1", "q2", DestinationKind::Queue, None, None)
        .expect("add");
    let names: Vec<_> = c.buses[0]
        .destinations
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["q1", "q2", "q10", "t1"], "natural name order");
    c.validate().expect("valid");
    assert_eq!(
        c.find_destination("bus1", "t1").map(|d| d.kind),
        Some(DestinationKind::Topic)
    );
    assert!(c.find_destination("bus1", "nope").is_none());
    assert!(c.find_destination("bus9", "q1").is_none());
}

#[test]
fn add_destination_errors() {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add");
    c.add_bus_member("bus1", "server2").expect("member");
    let before = c.clone();

    let e = c
        .add_destination("bus1", "q", DestinationKind::Queue, None, None)
        .expect_err("two members");
    assert!(matches!(e, ConfigError::MeRequired { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("node01.server1-bus1")
            && e.contains("node01.server2-bus1")
            && e.contains("--me ME"),
        "{e}"
    );

    let e = c
        .add_destination(
            "bus1",
            "q",
            DestinationKind::Queue,
            Some("node01.server1-bus2"),
            None,
        )
        .expect_err("unknown me")
        .to_string();
    assert!(
        e.contains("node01.server1-bus2") && e.contains("node01.server2-bus1"),
        "{e}"
    );

    let e = c
        .add_destination("bus9", "q", DestinationKind::Queue, None, None)
        .expect_err("unknown bus")
        .to_string();
    assert!(e.contains("bus9") && e.contains("known buses: bus1"), "{e}");

    for bad in ["_SYSTEM.Exception.Destination.x", "", "a b", "-q", "q/1"] {
        let e = c
            .add_destination(
                "bus1",
                bad,
                DestinationKind::Queue,
                Some("node01.server1-bus1"),
                None,
            )
            .expect_err(bad);
        assert!(
            matches!(e, ConfigError::BadDestinationName { .. }),
            "{bad}: {e:?}"
        );
    }
    let long = "q".repeat(129);
    assert!(c
        .add_destination(
            "bus1",
            &long,
            DestinationKind::Queue,
            Some("node01.server1-bus1"),
            None
        )
        .is_err());
    assert_eq!(c, before, "failed calls change nothing");

    let ok = "q".repeat(128);
    c.add_destination(
        "bus1",
        &ok,
        DestinationKind::Queue,
        Some("node01.server2-bus1"),
        None,
    )
    .expect("128 characters are fine");
    let e = c
        .add_destination(
            "bus1",
            &ok,
            DestinationKind::Topic,
            Some("node01.server1-bus1"),
            None,
        )
        .expect_err("dup");
    assert!(
        matches!(
            e,
            ConfigError::Duplicate {
                what: "destination",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("on bus bus1"), "{e}");
    c.validate().expect("valid");

    // A bus without members cannot hold a destination.
    c.buses[0].members.clear();
    c.buses[0].destinations.clear();
    let e = c
        .add_destination("bus1", "q", DestinationKind::Queue, None, None)
        .expect_err("no members")
        .to_string();
    assert!(
        e.contains("has no members") && e.contains("add-member"),
        "{e}"
    );
}

#[test]
fn set_initial_state_finds_the_engine_on_any_bus() {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add");
    c.add_bus_member("bus2", "server2").expect("member");
    let m = c
        .set_initial_state("node01.server2-bus2", InitialState::Stopped)
        .expect("set")
        .clone();
    assert_eq!(
        (m.server.as_str(), m.initial_state),
        ("server2", InitialState::Stopped)
    );
    assert_eq!(c.buses[1].members[0].initial_state, InitialState::Stopped);
    assert_eq!(c.buses[0].members[0].initial_state, InitialState::Started);
    c.set_initial_state("node01.server2-bus2", InitialState::Started)
        .expect("set");
    assert_eq!(c.buses[1].members[0].initial_state, InitialState::Started);
    let before = c.clone();
    let e = c
        .set_initial_state("node01.server9-bus1", InitialState::Stopped)
        .expect_err("unknown");
    assert!(matches!(e, ConfigError::UnknownMe { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("node01.server9-bus1")
            && e.contains("node01.server1-bus1")
            && e.contains("node01.server2-bus2"),
        "{e}"
    );
    assert_eq!(c, before);
}

#[test]
fn find_me_and_mes_of_server() {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add");
    c.add_bus_member("bus2", "server1").expect("member");
    c.add_bus_member("bus10", "server1").expect("member");
    c.add_bus_member("bus2", "server2").expect("member");
    let (b, m) = c.find_me("node01.server2-bus2").expect("found");
    assert_eq!((b.name.as_str(), m.server.as_str()), ("bus2", "server2"));
    assert!(c.find_me("node01.server2-bus1").is_none());
    let mes: Vec<_> = c
        .mes_of_server("node01", "server1")
        .into_iter()
        .map(|(b, m)| (b.name.clone(), m.me.clone()))
        .collect();
    assert_eq!(
        mes,
        [
            ("bus1".to_string(), "node01.server1-bus1".to_string()),
            ("bus2".to_string(), "node01.server1-bus2".to_string()),
            ("bus10".to_string(), "node01.server1-bus10".to_string()),
        ]
    );
    assert_eq!(c.mes_of_server("node01", "server2").len(), 1);
    assert!(c.mes_of_server("node02", "server1").is_empty());
    assert!(c.mes_of_server("node01", "server9").is_empty());
}

#[test]
fn validate_catches_each_destination_rule() {
    fn with(f: impl FnOnce(&mut BusCfg)) -> Result<()> {
        let mut c = sample_with_destinations();
        f(&mut c.buses[0]);
        c.validate()
    }
    // Destinations in order: orders, orders.dead, prices.
    let file = |r: Result<()>| match r {
        Err(ConfigError::Invalid { file, key, .. }) => (file, key),
        other => panic!("expected Invalid, got {other:?}"),
    };
    type Edit = Box<dyn FnOnce(&mut BusCfg)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "destination[3].name",
            Box::new(|b| b.destinations[2].name = "bad name".into()),
        ),
        (
            "destination[3].name",
            Box::new(|b| b.destinations[2].name = "_SYSTEM.x".into()),
        ),
        (
            "destination[3].name",
            Box::new(|b| b.destinations[2].name = "_x".into()),
        ),
        (
            "destination[3].name",
            Box::new(|b| b.destinations[2].name = "x".repeat(129)),
        ),
        (
            "destination[3].name",
            Box::new(|b| b.destinations[2].name = "orders.dead".into()),
        ),
        (
            "destination[3].me",
            Box::new(|b| b.destinations[2].me = "node01.server1-bus2".into()),
        ),
        (
            "destination[3].default_reliability",
            Box::new(|b| b.destinations[2].default_reliability = Reliability::ReliablePersistent),
        ),
        (
            "destination[1].default_priority",
            Box::new(|b| b.destinations[0].default_priority = 10),
        ),
        (
            "destination[1].max_failed_deliveries",
            Box::new(|b| b.destinations[0].max_failed_deliveries = 0),
        ),
        (
            "destination[1].max_failed_deliveries",
            Box::new(|b| b.destinations[0].max_failed_deliveries = 1001),
        ),
        (
            "destination[1].exception_destination",
            Box::new(|b| b.destinations[0].exception_destination = Some("orders".into())),
        ),
        (
            "destination[1].exception_destination",
            Box::new(|b| b.destinations[0].exception_destination = Some("ghost".into())),
        ),
        (
            "bus.max_message_bytes",
            Box::new(|b| b.max_message_bytes = 1023),
        ),
        (
            "bus.max_message_bytes",
            Box::new(|b| b.max_message_bytes = (256 << 20) + 1),
        ),
        (
            "bus.max_message_bytes",
            Box::new(|b| b.max_message_bytes = u64::MAX),
        ),
    ];
    for (want, f) in cases {
        let (f, key) = file(with(f));
        assert_eq!(key, want);
        assert_eq!(f, Path::new("buses/bus1.toml"));
    }
    // The edges are accepted.
    with(|b| {
        b.max_message_bytes = 1024;
        b.destinations[0].default_priority = 0;
        b.destinations[0].max_failed_deliveries = 1000;
        b.destinations[1].reliability = Reliability::BestEffort;
        b.destinations[1].default_reliability = Reliability::BestEffort;
    })
    .expect("valid");
    with(|b| b.max_message_bytes = 256 << 20).expect("valid");

    let e = with(|b| b.destinations[2].default_reliability = Reliability::AssuredPersistent)
        .expect_err("above max")
        .to_string();
    assert!(
        e.starts_with("buses/bus1.toml: key `destination[3].default_reliability` = \"assured_persistent\" is invalid: is above the destination's maximum reliability \"express\""),
        "{e}"
    );
    let e = with(|b| b.destinations[0].me = "node01.server9-bus1".into())
        .expect_err("me")
        .to_string();
    assert!(
        e.contains("node01.server1-bus1, node01.server2-bus1"),
        "{e}"
    );
}

#[test]
fn monitor_policy_defaults_fill_missing_fields() {
    let m: MonitorPolicy = toml::from_str("auto_restart = false").expect("parse");
    assert_eq!(
        m,
        MonitorPolicy {
            auto_restart: false,
            ..MonitorPolicy::default()
        }
    );
    assert_eq!(
        toml::Value::try_from(InitialState::Stopped).expect("ser"),
        toml::Value::String("stopped".into())
    );
}

/// A script with quotes, backslashes, TOML string delimiters, tabs and CRLF, so the file
/// round trip is tested on the hard cases.
pub(crate) const TRICKY_SCRIPT: &str = "// mover\nfn on_message(msg) {\n\tlet q = \"say \\\"hi\\\"\";\n    let p = 'c';\n    let s = \"\"\"not toml\"\"\" + '''nor this''';\n    send(\"out\", msg.body + \"\\\\n\");\r\n}\n";

/// `sample` plus: server2 as a member of bus1 and of bus2; queues `in`, `out`, topic `news`
/// on server1's engine and queue `far` on server2's, on bus1; data source pg1; applications
/// fwd (forward in → out), sq (sql on pg1) and sc (script), all on server1.
pub(crate) fn sample_with_apps() -> Config {
    let mut c = sample();
    c.add_server("node01", "server2").expect("add server");
    c.add_bus_member("bus1", "server2").expect("member");
    c.add_bus_member("bus2", "server2").expect("member");
    let me1 = "node01.server1-bus1";
    for (name, kind, me) in [
        ("in", DestinationKind::Queue, me1),
        ("out", DestinationKind::Queue, me1),
        ("news", DestinationKind::Topic, me1),
        ("far", DestinationKind::Queue, "node01.server2-bus1"),
    ] {
        c.add_destination("bus1", name, kind, Some(me), None)
            .expect("destination");
    }
    c.add_datasource(DataSourceCfg {
        name: "pg1".into(),
        kind: DataSourceKind::Postgres,
        url: "postgresql://keel@127.0.0.1:5432/db".into(),
        pool_max: DEFAULT_POOL_MAX,
    })
    .expect("datasource");
    c.add_app(app("fwd", AppKind::Forward)).expect("forward");
    c.add_app(app("sq", AppKind::Sql)).expect("sql");
    c.add_app(app("sc", AppKind::Script)).expect("script");
    c.validate().expect("valid");
    c
}

/// A valid application of `kind` on server1 receiving from bus1/in.
pub(crate) fn app(name: &str, kind: AppKind) -> AppCfg {
    let mut a = AppCfg {
        name: name.into(),
        server: "server1".into(),
        bus: "bus1".into(),
        on: "in".into(),
        kind,
        to: None,
        datasource: None,
        statement: None,
        script: None,
        concurrency: DEFAULT_APP_CONCURRENCY,
        timeout_s: DEFAULT_APP_TIMEOUT_S,
    };
    match kind {
        AppKind::Forward => a.to = Some("out".into()),
        AppKind::Sql => {
            a.datasource = Some("pg1".into());
            a.statement = Some("INSERT INTO t(body) VALUES ($1)".into());
        }
        AppKind::Script => a.script = Some(TRICKY_SCRIPT.into()),
    }
    a
}

#[test]
fn kinds_are_spelled_as_documented() {
    for k in [DataSourceKind::Postgres, DataSourceKind::MariaDb] {
        assert_eq!(DataSourceKind::parse(k.as_str()), Some(k));
        assert_eq!(
            toml::Value::try_from(k).expect("ser"),
            toml::Value::String(k.as_str().into())
        );
    }
    assert_eq!(DataSourceKind::MariaDb.as_str(), "mariadb");
    assert_eq!(DataSourceKind::parse("mysql"), None);
    for k in [AppKind::Forward, AppKind::Sql, AppKind::Script] {
        assert_eq!(AppKind::parse(k.as_str()), Some(k));
        assert_eq!(
            toml::Value::try_from(k).expect("ser"),
            toml::Value::String(k.as_str().into())
        );
    }
    assert_eq!(
        [AppKind::Forward, AppKind::Sql, AppKind::Script].map(AppKind::as_str),
        ["forward", "sql", "script"]
    );
    assert_eq!(AppKind::parse("Forward"), None);
}

#[test]
fn url_passwords_are_found_and_taken_out() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "postgresql://u:secret@127.0.0.1:5432/db",
            "postgresql://u@127.0.0.1:5432/db",
            Some("secret"),
        ),
        ("mysql://u:p%40ss%2F@h/db", "mysql://u@h/db", Some("p@ss/")),
        (
            "mysql://u:p@ss/x@h:3306/db",
            "mysql://u@h:3306/db",
            Some("p@ss/x"),
        ),
        ("mariadb://u:100%@h/db", "mariadb://u@h/db", Some("100%")),
        ("postgresql://u@h/db", "postgresql://u@h/db", None),
        ("postgresql://h:5432/db", "postgresql://h:5432/db", None),
        ("postgresql:///db", "postgresql:///db", None),
        ("u:pw@h", "u@h", Some("pw")),
    ];
    for (url, clean, pw) in cases {
        let (c, p) = take_url_password(url);
        assert_eq!((c.as_str(), p.as_deref()), (*clean, *pw), "{url}");
        assert_eq!(url_has_password(url), pw.is_some(), "{url}");
        assert!(!url_has_password(&c), "{c}");
    }
}

#[test]
fn datasource_and_app_api() {
    let mut c = sample_with_apps();
    let names: Vec<&str> = c.apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["fwd", "sc", "sq"]);
    assert_eq!(c.apps_of_server("server1").len(), 3);
    assert!(c.apps_of_server("server2").is_empty());
    assert_eq!(c.app("sq").map(|a| a.kind), Some(AppKind::Sql));
    assert_eq!(c.datasource("pg1").map(|d| d.pool_max), Some(16));
    let before = c.clone();

    // Refusals change nothing.
    let e = c.add_app(app("sq", AppKind::Sql)).expect_err("dup");
    assert!(matches!(e, ConfigError::Duplicate { .. }), "{e:?}");
    let e = c
        .add_app(AppCfg {
            server: "ghost".into(),
            ..app("a1", AppKind::Forward)
        })
        .expect_err("server");
    assert!(matches!(e, ConfigError::UnknownServer { .. }), "{e:?}");
    let e = c
        .add_app(AppCfg {
            bus: "bus9".into(),
            ..app("a1", AppKind::Forward)
        })
        .expect_err("bus");
    assert!(matches!(e, ConfigError::UnknownBus { .. }), "{e:?}");
    let e = c
        .add_app(AppCfg {
            datasource: Some("ghost".into()),
            ..app("a1", AppKind::Sql)
        })
        .expect_err("ds");
    assert!(e.to_string().contains("no data source `ghost`"), "{e}");
    let e = c
        .add_app(AppCfg {
            on: "far".into(),
            ..app("a1", AppKind::Forward)
        })
        .expect_err("on");
    assert!(
        matches!(&e, ConfigError::Invalid { key, .. } if key == "app.on"),
        "{e:?}"
    );
    assert!(c.add_app(app("bad name", AppKind::Forward)).is_err());
    let e = c
        .add_datasource(c.datasources[0].clone())
        .expect_err("dup ds");
    assert!(matches!(e, ConfigError::Duplicate { .. }), "{e:?}");
    let e = c
        .add_datasource(DataSourceCfg {
            name: "m1".into(),
            kind: DataSourceKind::MariaDb,
            url: "mysql://u:s3cret@h/db".into(),
            pool_max: 4,
        })
        .expect_err("password");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    let e = c.remove_datasource("pg1").expect_err("in use").to_string();
    assert!(e.contains("pg1") && e.contains("sq"), "{e}");
    assert!(matches!(
        c.remove_datasource("pg9"),
        Err(ConfigError::UnknownDataSource { .. })
    ));
    assert!(matches!(
        c.remove_app("nope"),
        Err(ConfigError::UnknownApp { .. })
    ));
    assert_eq!(c, before);

    c.add_datasource(DataSourceCfg {
        name: "m10".into(),
        kind: DataSourceKind::MariaDb,
        url: "mariadb://keel@127.0.0.1:3306/db".into(),
        pool_max: 256,
    })
    .expect("mariadb");
    c.add_datasource(DataSourceCfg {
        name: "m2".into(),
        kind: DataSourceKind::MariaDb,
        url: "mysql://keel@127.0.0.1/db".into(),
        pool_max: 1,
    })
    .expect("mysql");
    let names: Vec<&str> = c.datasources.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["m2", "m10", "pg1"], "natural name order");
    assert_eq!(c.remove_app("sq").expect("remove").name, "sq");
    assert_eq!(c.remove_datasource("pg1").expect("remove").name, "pg1");
    c.validate().expect("valid");
}

#[test]
fn validate_catches_each_datasource_rule() {
    type Edit = Box<dyn FnOnce(&mut Config)>;
    fn ds(f: fn(&mut DataSourceCfg)) -> Edit {
        Box::new(move |c| f(&mut c.datasources[0]))
    }
    let cases: Vec<(&str, Edit)> = vec![
        ("datasource.name", ds(|d| d.name = "bad name".into())),
        (
            "datasource.name",
            Box::new(|c| {
                let d = c.datasources[0].clone();
                c.datasources.push(d);
            }),
        ),
        ("datasource.url", ds(|d| d.url = "mysql://keel@h/db".into())),
        (
            "datasource.url",
            ds(|d| {
                d.kind = DataSourceKind::MariaDb;
                d.url = "postgresql://keel@h/db".into();
            }),
        ),
        ("datasource.url", ds(|d| d.url = "postgresql://".into())),
        (
            "datasource.url",
            ds(|d| d.url = "postgresql://h/my db".into()),
        ),
        ("datasource.pool_max", ds(|d| d.pool_max = 0)),
        ("datasource.pool_max", ds(|d| d.pool_max = 257)),
    ];
    for (want, f) in cases {
        let mut c = sample_with_apps();
        f(&mut c);
        assert_eq!(invalid_key(c.validate()), want);
    }
    // A password is refused and never echoed, whatever the scheme.
    for url in [
        "postgresql://keel:s3cret@h/db",
        "postgres://keel:s3cret@h/db",
        "mysql://keel:s3cret@h/db",
        "keel:s3cret@h/db",
    ] {
        let mut c = sample_with_apps();
        c.datasources[0].url = url.into();
        let e = c.validate().expect_err(url);
        assert!(
            matches!(&e, ConfigError::Invalid { key, file, .. } if key == "datasource.url" && file == Path::new("datasources/pg1.toml")),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(!e.contains("s3cret") && e.contains("password"), "{e}");
    }
    let mut c = sample_with_apps();
    c.datasources[0].pool_max = 256;
    c.datasources[0].url = "postgres://keel@[::1]:5432/db?sslmode=disable".into();
    c.validate().expect("edges are valid");
}

#[test]
fn validate_catches_each_app_rule() {
    type Edit = Box<dyn FnOnce(&mut AppCfg)>;
    fn long(n: usize) -> String {
        "x".repeat(n)
    }
    // (app to edit, expected key, edit)
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("fwd", "app.name", Box::new(|a| a.name = "-x".into())),
        ("fwd", "app.server", Box::new(|a| a.server = "ghost".into())),
        ("fwd", "app.bus", Box::new(|a| a.bus = "bus9".into())),
        // server1 is not a member of bus2.
        ("fwd", "app.bus", Box::new(|a| a.bus = "bus2".into())),
        ("fwd", "app.on", Box::new(|a| a.on = "ghost".into())),
        ("fwd", "app.on", Box::new(|a| a.on = "news".into())),
        ("fwd", "app.on", Box::new(|a| a.on = "far".into())),
        ("fwd", "app.concurrency", Box::new(|a| a.concurrency = 0)),
        ("fwd", "app.concurrency", Box::new(|a| a.concurrency = 65)),
        ("fwd", "app.to", Box::new(|a| a.to = None)),
        ("fwd", "app.to", Box::new(|a| a.to = Some("ghost".into()))),
        ("fwd", "app.to", Box::new(|a| a.to = Some("far".into()))),
        ("fwd", "app.to", Box::new(|a| a.to = Some("in".into()))),
        (
            "fwd",
            "app.datasource",
            Box::new(|a| a.datasource = Some("pg1".into())),
        ),
        (
            "fwd",
            "app.statement",
            Box::new(|a| a.statement = Some("SELECT 1".into())),
        ),
        (
            "fwd",
            "app.script",
            Box::new(|a| a.script = Some("fn on_message(m) {}".into())),
        ),
        ("sq", "app.datasource", Box::new(|a| a.datasource = None)),
        (
            "sq",
            "app.datasource",
            Box::new(|a| a.datasource = Some("pg9".into())),
        ),
        ("sq", "app.statement", Box::new(|a| a.statement = None)),
        (
            "sq",
            "app.statement",
            Box::new(|a| a.statement = Some(" \n".into())),
        ),
        (
            "sq",
            "app.statement",
            Box::new(|a| a.statement = Some(long(64 * 1024 + 1))),
        ),
        (
            "sq",
            "app.statement",
            Box::new(|a| a.statement = Some("SELECT \u{1}".into())),
        ),
        ("sq", "app.to", Box::new(|a| a.to = Some("out".into()))),
        (
            "sq",
            "app.script",
            Box::new(|a| a.script = Some("x".into())),
        ),
        ("sc", "app.script", Box::new(|a| a.script = None)),
        (
            "sc",
            "app.script",
            Box::new(|a| a.script = Some(String::new())),
        ),
        (
            "sc",
            "app.script",
            Box::new(|a| a.script = Some(long(256 * 1024 + 1))),
        ),
        (
            "sc",
            "app.script",
            Box::new(|a| a.script = Some("fn on_message(m) {\0}".into())),
        ),
        ("sc", "app.to", Box::new(|a| a.to = Some("out".into()))),
        (
            "sc",
            "app.datasource",
            Box::new(|a| a.datasource = Some("pg1".into())),
        ),
        (
            "sc",
            "app.statement",
            Box::new(|a| a.statement = Some("SELECT 1".into())),
        ),
    ];
    for (name, want, f) in cases {
        let mut c = sample_with_apps();
        let a = c.apps.iter_mut().find(|a| a.name == name).expect("app");
        f(a);
        let file = rel_app(&a.name);
        match c.validate() {
            Err(ConfigError::Invalid { key, file: f, .. }) => {
                assert_eq!((name, key.as_str()), (name, want));
                assert_eq!(f, file);
            }
            other => panic!("{name} {want}: expected Invalid, got {other:?}"),
        }
    }
    // Duplicate names.
    let mut c = sample_with_apps();
    let a = c.apps[0].clone();
    c.apps.push(a);
    assert_eq!(invalid_key(c.validate()), "app.name");
    // A script is never echoed in an error, only its size.
    let mut c = sample_with_apps();
    c.apps[0].script = Some("let secret_token = 1;".into());
    let e = c.validate().expect_err("forward with script").to_string();
    assert!(
        !e.contains("secret_token") && e.contains("a script of 21 bytes"),
        "{e}"
    );
    // The edges are accepted.
    let mut c = sample_with_apps();
    for a in &mut c.apps {
        a.concurrency = if a.kind == AppKind::Sql { 1 } else { 64 };
        match a.kind {
            AppKind::Forward => a.to = Some("news".into()),
            AppKind::Sql => a.statement = Some(long(64 * 1024)),
            AppKind::Script => a.script = Some(long(256 * 1024)),
        }
    }
    c.validate().expect("edges are valid");
}

#[test]
fn removing_what_an_app_needs_is_caught() {
    // The server (with its memberships and the queues of its engines).
    let mut c = sample_with_apps();
    for b in &mut c.buses {
        b.members.retain(|m| m.server != "server1");
        b.destinations.retain(|d| d.me != "node01.server1-bus1");
    }
    c.nodes[0].servers.retain(|s| s.name != "server1");
    assert_eq!(invalid_key(c.validate()), "app.server");
    // The bus membership (and the queues of the engine that went with it).
    let mut c = sample_with_apps();
    c.buses[0].members.retain(|m| m.server != "server1");
    c.buses[0]
        .destinations
        .retain(|d| d.me != "node01.server1-bus1");
    assert_eq!(invalid_key(c.validate()), "app.bus");
    // A destination.
    let mut c = sample_with_apps();
    c.buses[0].destinations.retain(|d| d.name != "out");
    assert_eq!(invalid_key(c.validate()), "app.to");
    // A data source.
    let mut c = sample_with_apps();
    c.datasources.clear();
    assert_eq!(invalid_key(c.validate()), "app.datasource");
}

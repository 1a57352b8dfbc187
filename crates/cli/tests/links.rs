//! ME-to-ME links on the bus port, with a real server: a member engine of the bus with the
//! right credential is let in; another bus, a non-member, a wrong credential and malformed
//! frames are refused and logged; AMQP keeps working on the same port.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use common::Env;
use keel_bus::auth;
use keel_bus::link::{LinkCodec, LinkFrame, PROTOCOL_HEADER};
use tokio_util::codec::{Decoder, Encoder};

const ME1: &str = "node01.server1-bus1";
const ME2: &str = "node01.server2-bus1";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn open(bus: &str, me: &str, uuid: &str, key: &[u8; 32]) -> LinkFrame {
    LinkFrame::Open {
        bus: bus.into(),
        me: me.into(),
        me_uuid: uuid.into(),
        incarnation: 1,
        credential_proof: auth::make_proof(key, now_ms(), bus, me, uuid),
        streams: vec![],
    }
}

/// Opens a link, sends `bytes` after the header, then the `after` frames once the server has
/// answered, and returns every frame the server sent until it closed the connection.
fn exchange(port: u16, first: &[u8], after: &[LinkFrame]) -> Vec<LinkFrame> {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    exchange_on(sock, first, after)
}

/// [`exchange`] inside TLS, showing the certificate of `process` (`<node>.<process>`) of the
/// profile's cell, or none.
fn exchange_tls(
    env: &Env,
    port: u16,
    process: Option<&str>,
    first: &[u8],
    after: &[LinkFrame],
) -> Vec<LinkFrame> {
    let pki = keel_tls::Pki::at(env.profile.join("secrets/tls"));
    let config = match process {
        Some(p) => pki.mutual_client_config(p).unwrap(),
        None => pki.client_config().unwrap(),
    };
    let name = keel_tls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = keel_tls::rustls::ClientConnection::new(config, name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    exchange_on(keel_tls::rustls::StreamOwned::new(conn, sock), first, after)
}

fn exchange_on(mut sock: impl Read + Write, first: &[u8], after: &[LinkFrame]) -> Vec<LinkFrame> {
    sock.write_all(&PROTOCOL_HEADER).unwrap();
    sock.write_all(first).unwrap();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut sent_after = false;
    loop {
        let mut chunk = [0u8; 4096];
        let n = match sock.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => panic!("the server answers or closes in time: {e}"),
        };
        if n == 0 {
            return frames;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(f) = LinkCodec::trusted()
            .decode(&mut buf)
            .expect("the server's frames decode")
        {
            frames.push(f);
        }
        if !frames.is_empty() && !sent_after {
            sent_after = true;
            for f in after {
                sock.write_all(&encode(f.clone())).unwrap();
            }
        }
    }
}

fn encode(f: LinkFrame) -> Vec<u8> {
    let mut out = BytesMut::new();
    LinkCodec::trusted().encode(f, &mut out).unwrap();
    out.to_vec()
}

fn closed_because(frames: &[LinkFrame]) -> String {
    match frames {
        [LinkFrame::Close { reason }] => reason.clone(),
        other => panic!("expected one Close frame, got {other:?}"),
    }
}

#[test]
fn member_engines_are_let_in_and_strangers_are_refused() {
    let env = Env::new();
    env.add_second_member();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let port = env.bus_port("server1");
    let mes: serde_json::Value = serde_json::from_str(&env.ok(&["me", "list", "--json"])).unwrap();
    let uuid_of = |me: &str| {
        mes.as_array()
            .unwrap()
            .iter()
            .find(|m| m["me"] == me)
            .unwrap_or_else(|| panic!("{me} in {mes}"))["uuid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (uuid1, uuid2) = (uuid_of(ME1), uuid_of(ME2));
    let key = auth::link_key(env.admin_password().as_bytes(), "bus1");

    // A member with the profile's credential: the server answers with its own Open, whose
    // proof checks out under the same key.
    let frames = exchange(
        port,
        &encode(open("bus1", ME2, &uuid2, &key)),
        &[LinkFrame::Close {
            reason: "test done".into(),
        }],
    );
    match &frames[..] {
        [LinkFrame::Open {
            bus,
            me,
            me_uuid,
            credential_proof,
            streams,
            ..
        }] => {
            assert_eq!(
                (bus.as_str(), me.as_str(), me_uuid.as_str()),
                ("bus1", ME1, uuid1.as_str())
            );
            assert!(streams.is_empty());
            auth::verify_proof(&key, credential_proof, now_ms(), bus, me, me_uuid).unwrap();
        }
        other => panic!("expected the server's Open, got {other:?}"),
    }

    // Strangers: each gets a Close that says why, and a CWSIT0004W line.
    let wrong_key = auth::link_key(b"another profile's secret", "bus1");
    let why = closed_because(&exchange(
        port,
        &encode(open("bus1", ME2, &uuid2, &wrong_key)),
        &[],
    ));
    assert!(why.contains("credential"), "{why}");
    let other_bus_key = auth::link_key(env.admin_password().as_bytes(), "bus9");
    let why = closed_because(&exchange(
        port,
        &encode(open("bus9", ME2, &uuid2, &other_bus_key)),
        &[],
    ));
    assert!(why.contains("bus bus9"), "{why}");
    let why = closed_because(&exchange(
        port,
        &encode(open("bus1", "node01.server7-bus1", &uuid2, &key)),
        &[],
    ));
    assert!(why.contains("not a member"), "{why}");
    let why = closed_because(&exchange(
        port,
        &encode(open("bus1", ME2, &uuid1, &key)),
        &[],
    ));
    assert!(why.contains("UUID"), "{why}");
    let why = closed_because(&exchange(
        port,
        &encode(open("bus1", ME1, &uuid1, &key)),
        &[],
    ));
    assert!(why.contains("an engine of this server"), "{why}");

    // Over TLS the peer must show the certificate of the server that hosts the engine it
    // claims to be (mutual TLS), on top of the credential proof.
    let frames = exchange_tls(
        &env,
        port,
        Some("node01.server2"),
        &encode(open("bus1", ME2, &uuid2, &key)),
        &[LinkFrame::Close {
            reason: "test done".into(),
        }],
    );
    assert!(
        matches!(&frames[..], [LinkFrame::Open { .. }]),
        "{frames:?}"
    );
    let why = closed_because(&exchange_tls(
        &env,
        port,
        Some("node01.nodeagent"),
        &encode(open("bus1", ME2, &uuid2, &key)),
        &[],
    ));
    assert!(
        why.contains("its certificate names process node01/nodeagent, but node01.server2-bus1 runs on node01/server2"),
        "{why}"
    );
    let why = closed_because(&exchange_tls(
        &env,
        port,
        None,
        &encode(open("bus1", ME2, &uuid2, &key)),
        &[],
    ));
    assert!(why.contains("without a client certificate"), "{why}");

    // Malformed frames close that link only, with nothing sent back.
    let mut garbage = encode(open("bus1", ME2, &uuid2, &key));
    let last = garbage.len() - 1;
    garbage[last] ^= 0xff; // the checksum no longer matches
    assert!(exchange(port, &garbage, &[]).is_empty());
    assert!(exchange(port, &[0xff; 64], &[]).is_empty());

    // AMQP on the same port still answers its protocol header with its own.
    let mut amqp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    amqp.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    amqp.write_all(b"AMQP\x03\x01\x00\x00").unwrap();
    let mut head = [0u8; 8];
    amqp.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"AMQP\x03\x01\x00\x00");

    let log = env.wait_for(Duration::from_secs(10), "the link log lines", || {
        let log = env.log("server1");
        (log.matches("CWSIT0004W").count() >= 9).then_some(log)
    });
    assert!(
        log.contains(&format!("CWSIT0005I: Messaging engine link from {ME2}")),
        "{log}"
    );
    assert!(
        log.contains("CWSIT0006I") && log.contains("test done"),
        "{log}"
    );
    assert!(log.contains("checksum"), "{log}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn member_engines_link_up_and_relink_after_a_peer_restarts() {
    let env = Env::new();
    env.add_second_member();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["server", "start", "server2"]);
    let linked = |server: &str, to: &str| {
        let line = format!(
            "CWSIT0007I: Messaging engine {} linked to messaging engine {to}",
            if server == "server1" { ME1 } else { ME2 }
        );
        env.log(server).matches(&line).count()
    };
    env.wait_for(Duration::from_secs(20), "links both ways", || {
        (linked("server1", ME2) >= 1 && linked("server2", ME1) >= 1).then_some(())
    });
    // Both ways over mutual TLS, each side naming the other's certificate.
    assert!(
        env.log("server2")
            .contains("(mutual TLS with the certificate of node01/server1)"),
        "{}",
        env.log("server2")
    );
    assert!(
        env.log("server1")
            .contains("(mutual TLS with the certificate of node01/server2)"),
        "{}",
        env.log("server1")
    );
    assert!(env
        .log("server2")
        .contains(&format!("CWSIT0005I: Messaging engine link from {ME1}")));
    assert!(env
        .log("server1")
        .contains(&format!("CWSIT0005I: Messaging engine link from {ME2}")));

    // The peer goes away: the loss is logged once; when it is back, the link comes up again.
    env.ok(&["server", "stop", "server2"]);
    env.wait_for(Duration::from_secs(20), "the loss logged", || {
        env.log("server1")
            .contains(&format!(
                "CWSIT0008W: Messaging engine {ME1} has no link to messaging engine {ME2}"
            ))
            .then_some(())
    });
    env.ok(&["server", "start", "server2"]);
    env.wait_for(Duration::from_secs(30), "the link again", || {
        (linked("server1", ME2) >= 2).then_some(())
    });
    let log = env.log("server1");
    let warnings = log.matches("CWSIT0008W").count();
    assert!(
        warnings <= 4,
        "one line per distinct reason, not one per attempt: {log}"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

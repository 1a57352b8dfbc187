//! Connecting a link to a peer engine, with back-off, and the source side it then runs.

use super::*;

/// First and largest pause between attempts to link to a peer.
pub const RECONNECT_FIRST_MS: u64 = 100;
pub const RECONNECT_MAX_MS: u64 = 10_000;
/// How long a connect and the peer's answering `Open` may take.
pub const CONNECT_WAIT_MS: u64 = 5_000;

/// Keeps `engine` linked to `peer` until the task is aborted: connects, proves its credential,
/// checks the peer's, holds the link, and after a failure or a loss tries again with back-off
/// (doubling from RECONNECT_FIRST_MS up to RECONNECT_MAX_MS, each pause jittered down to half). Logs `CWSIT0007I` when a link
/// comes up and `CWSIT0008W` when an attempt fails or a link is lost, once per distinct reason,
/// so a peer that stays down does not flood the log.
///
/// With `tls` (this server's certificate and the cell's CA) the link runs over mutual TLS:
/// the peer's certificate must name the address called and the process that hosts `peer`.
pub async fn keep_linked(engine: Arc<Engine>, shared_secret: Vec<u8>, peer: Peer, tls: LinkTls) {
    let ours = engine.config().clone();
    let key = auth::link_key(&shared_secret, &ours.bus);
    let mut pause_ms = RECONNECT_FIRST_MS;
    let mut last_failure: Option<String> = None;
    loop {
        if engine.state() != keel_engine::MeState::Started {
            // Nothing to link until this engine runs; look again shortly.
            tokio::time::sleep(Duration::from_millis(RECONNECT_MAX_MS / 10)).await;
            continue;
        }
        let failure = match link_once(&engine, &key, &peer, tls.as_ref()).await {
            Ok(lost) => {
                // It was up: the next failure is news, and retrying starts quickly again.
                pause_ms = RECONNECT_FIRST_MS;
                last_failure = None;
                format!("the link was lost ({lost})")
            }
            Err(why) => why.to_string(),
        };
        if last_failure.as_deref() != Some(failure.as_str()) {
            emit!(
                catalog::CWSIT0008W,
                me = ours.me,
                peer = peer.me,
                address = peer.address,
                why = failure
            );
            last_failure = Some(failure);
        }
        tokio::time::sleep(Duration::from_millis(jittered(
            pause_ms,
            keel_core::random_u64(),
        )))
        .await;
        pause_ms = (pause_ms * 2).min(RECONNECT_MAX_MS);
    }
}

/// A pause between `pause_ms / 2` and `pause_ms` ("equal jitter"): the engines of a cell that
/// lost the same peer (a restart, a healed partition) do not all call it at the same instants.
fn jittered(pause_ms: u64, random: u64) -> u64 {
    let half = pause_ms / 2;
    half + random % (pause_ms - half + 1)
}

/// One link: Err(why) if it never came up, Ok(why it ended) once it was up.
pub(crate) async fn link_once(
    engine: &Engine,
    key: &[u8; 32],
    peer: &Peer,
    tls: Option<&Arc<keel_tls::rustls::ClientConfig>>,
) -> Result<String, LinkError> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    let sock = match tokio::time::timeout(wait, TcpStream::connect(&peer.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(LinkError::Connect(e)),
        Err(_) => {
            return Err(LinkError::Timeout {
                what: "connection",
                ms: CONNECT_WAIT_MS,
            })
        }
    };
    let _ = sock.set_nodelay(true);
    harden(&sock).map_err(LinkError::Socket)?;
    let Some(tls) = tls else {
        return source_link(engine, key, peer, Transport::Plain, sock).await;
    };
    let host = peer
        .address
        .rsplit_once(':')
        .map_or(peer.address.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    let name = keel_tls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| LinkError::Protocol(format!("{host} is no host name or address ({e})")))?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let sock = match tokio::time::timeout(wait, connector.connect(name, sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(LinkError::Protocol(format!(
                "the TLS handshake with {} failed ({e})",
                peer.address
            )))
        }
        Err(_) => {
            return Err(LinkError::Timeout {
                what: "TLS handshake",
                ms: CONNECT_WAIT_MS,
            })
        }
    };
    // The name check proved a process of this cell answers at the address; the certificate
    // must also be the one of the server that hosts the peer engine.
    let expected = (peer.node.clone(), peer.server.clone());
    match keel_tls::peer_process(sock.get_ref().1.peer_certificates()) {
        Some(p) if p == expected => {}
        shown => {
            return Err(LinkError::Protocol(format!(
                "the certificate at {} names {}, not {}/{}, which hosts {}",
                peer.address,
                shown.map_or("no Keel process".to_string(), |(n, s)| format!(
                    "process {n}/{s}"
                )),
                expected.0,
                expected.1,
                peer.me
            )))
        }
    }
    let transport = Transport::Tls(Some(expected));
    source_link(engine, key, peer, transport, sock).await
}

/// The connecting side of one link over `sock` (connected, socket options set): header,
/// `Open`, the peer's checks and verdicts, then the source side of this engine's stream until
/// the link ends. Err(why) if it never came up, Ok(why it ended) once it was up. Generic over
/// the byte stream so simulations can drive it over a simulated network.
pub async fn source_link<S: LinkIo>(
    engine: &Engine,
    key: &[u8; 32],
    peer: &Peer,
    transport: Transport,
    mut sock: S,
) -> Result<String, LinkError> {
    let ours = engine.config();
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    sock.write_all(&keel_bus::link::PROTOCOL_HEADER)
        .await
        .map_err(LinkError::write)?;
    let incarnation = engine.info().await.map_or(0, |i| i.incarnation);
    let messaging = engine.messaging().map_err(LinkError::engine)?;
    let stream = messaging
        .out_stream(&peer.me)
        .await
        .map_err(LinkError::engine)?;
    let mut st = stream.state().await;
    // The answer is bounded like any frame before its sender is checked.
    let mut framed = Framed::new(sock, LinkCodec::default());
    let open = open_frame(key, ours, incarnation, vec![stream_state(&st)]);
    framed.send(open).await.map_err(LinkError::write)?;
    let answer = match tokio::time::timeout(wait, framed.next()).await {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => return Err(LinkError::Frame(e)),
        Ok(None) => {
            return Err(LinkError::Closed {
                when: "without an answer",
            })
        }
        Err(_) => {
            return Err(LinkError::Timeout {
                what: "answer",
                ms: CONNECT_WAIT_MS,
            })
        }
    };
    match answer {
        LinkFrame::Open {
            bus,
            me,
            me_uuid,
            credential_proof,
            ..
        } => {
            if bus != ours.bus || me != peer.me || me_uuid != peer.uuid {
                return Err(LinkError::Protocol(format!(
                    "the answer came from engine {me} ({me_uuid}) of bus {bus}, not {} ({}) of bus {}",
                    peer.me, peer.uuid, ours.bus
                )));
            }
            auth::verify_proof(key, &credential_proof, now_ms(), &bus, &me, &me_uuid)
                .map_err(|e| LinkError::Protocol(format!("the peer's {e}")))?;
            framed.codec_mut().authenticated();
        }
        LinkFrame::Close { reason } => return Err(LinkError::Refused(reason)),
        _ => {
            return Err(LinkError::Protocol(
                "the peer's first frame was not Open".into(),
            ))
        }
    }
    // The peer's verdict on our stream. A peer that runs a FLUSH first asks for the stream to
    // move onto a new one made for its flush: done here, then the peer judges the new stream.
    let mut verdict = read_verdict(&mut framed, st.stream_id()).await?;
    let mut rounds = 0;
    while verdict.0 == VerdictKind::FlushRequested {
        rounds += 1;
        let Some(epoch) = verdict.4.clone().filter(|_| rounds <= FLUSH_ROUNDS_MAX) else {
            return Err(LinkError::Protocol(format!(
                "the peer asked for a flush without an epoch or more than {FLUSH_ROUNDS_MAX} times"
            )));
        };
        st = messaging
            .out_flush(&peer.me, &epoch)
            .await
            .map_err(LinkError::engine)?;
        framed
            .send(LinkFrame::Flush {
                stream: stream_state(&st),
            })
            .await
            .map_err(LinkError::write)?;
        verdict = read_verdict(&mut framed, st.stream_id()).await?;
    }
    emit!(
        catalog::CWSIT0007I,
        me = ours.me,
        peer = peer.me,
        address = peer.address,
        transport = transport
    );
    let (kind, a, b, last, _) = verdict;
    let verdict = match check_verdict(&messaging, peer, &st, (kind, a, b, last)).await {
        Ok(v) => v,
        Err(e) => return Ok(format!("checking the peer's verdict failed ({e})")),
    };
    let from = match verdict {
        Ok(from) => {
            // The peer resumed a stream of ours made after any FLUSH of this engine: its
            // outbound side of that flush is confirmed.
            if let Err(e) = messaging.flush_confirm(&peer.me, FlushSide::Outbound).await {
                return Ok(format!("recording the flush confirmation failed ({e})"));
            }
            Some(from)
        }
        Err(why) => {
            emit!(
                catalog::CWSIT0009E,
                stream = st.stream_id(),
                me = ours.me,
                peer = peer.me,
                why = why
            );
            None
        }
    };
    Ok(source_side(&messaging, peer, &stream, from, &mut framed).await)
}

#[cfg(test)]
mod tests {
    use super::jittered;

    #[test]
    fn jitter_stays_between_half_and_the_whole_pause() {
        for pause in [super::RECONNECT_FIRST_MS, 1_000, super::RECONNECT_MAX_MS] {
            let mut seen = std::collections::BTreeSet::new();
            for r in [0, 1, 7, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
                let p = jittered(pause, r);
                assert!((pause / 2..=pause).contains(&p), "{pause}: {p}");
                seen.insert(p);
            }
            assert!(seen.len() > 1, "the pause varies");
        }
        assert_eq!(jittered(0, 12345), 0);
    }
}

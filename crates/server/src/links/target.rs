//! The target side of a link: verdicts, in-order messages stored with the prefix, acks, and
//! the peer's remote gets answered.

use super::*;

/// What a frame weighs in a target's batch (see DELIVER_BATCH_BYTES_MAX).
pub(crate) fn frame_bytes(f: &LinkFrame) -> usize {
    match f {
        LinkFrame::Data {
            body, properties, ..
        } => body.len() + properties.len() + 256,
        _ => 64,
    }
}

/// A message ID as keel-bus identifies it.
#[derive(Debug)]
pub(crate) struct Ident(String);

impl keel_bus::Identified for Ident {
    fn identity(&self) -> String {
        self.0.clone()
    }
}

/// The target side of an accepted link: a verdict for each of the peer's streams, then each
/// in-order message stored with its stream's prefix (one commit) before its ack. Ok(why the
/// link ended), or Err(why to close it).
pub(crate) async fn target_side<S: LinkIo>(
    engine: &Engine,
    peer_me: &str,
    streams: Vec<StreamState>,
    framed: &mut Framed<S, LinkCodec>,
) -> Result<String, LinkError> {
    let messaging = engine.messaging().map_err(LinkError::engine)?;
    let mut lent = Lent::default();
    let r = target_loop(engine, &messaging, peer_me, streams, framed, &mut lent).await;
    release_lent(&messaging, lent).await;
    r
}

pub(crate) async fn target_loop<S: LinkIo>(
    engine: &Engine,
    messaging: &Messaging,
    peer_me: &str,
    streams: Vec<StreamState>,
    framed: &mut Framed<S, LinkCodec>,
    lent: &mut Lent,
) -> Result<String, LinkError> {
    let ours = &engine.config().me;
    let mut target = keel_bus::Target::default();
    for s in streams {
        if let Some(why) = handshake(messaging, ours, peer_me, s, &mut target, framed).await? {
            return Ok(why);
        }
    }
    loop {
        let next = tokio::select! {
            f = framed.next() => f,
            _ = messaging.stopped() => return Err(LinkError::Engine(format!("engine {ours} stopped"))),
        };
        let first = match next {
            None => return Ok("the peer closed the connection".into()),
            Some(Err(e)) => return Err(LinkError::Frame(e)),
            Some(Ok(f)) => f,
        };
        // This frame and those already here: in-order messages of one stream are stored with
        // one commit and acknowledged with one ack (bounded by DELIVER_BATCH_MAX).
        let mut bytes = frame_bytes(&first);
        let mut frames = vec![first];
        while frames.len() < DELIVER_BATCH_MAX && bytes < DELIVER_BATCH_BYTES_MAX {
            match framed.next().now_or_never() {
                Some(Some(Ok(f))) => {
                    bytes += frame_bytes(&f);
                    frames.push(f);
                }
                Some(Some(Err(e))) => return Err(LinkError::Frame(e)),
                Some(None) | None => break,
            }
        }
        let mut batch: Option<(String, Vec<StreamMessage>)> = None;
        let mut replies = Vec::new();
        for frame in frames {
            match frame {
                LinkFrame::Close { reason } => {
                    store_batch(messaging, peer_me, batch.take(), &mut replies).await?;
                    send_all(framed, replies).await?;
                    return Ok(format!("the peer closed it ({reason})"));
                }
                LinkFrame::Data {
                    stream_id,
                    tick,
                    message_id,
                    priority,
                    reliability,
                    expiry_ms,
                    destination,
                    properties,
                    body,
                } => {
                    if tick == 0 {
                        return Err(LinkError::Protocol("a data frame with tick 0".into()));
                    }
                    match target.on_data(&stream_id, tick, Ident(message_id.clone())) {
                        keel_bus::Delivery::Deliver { .. } => {
                            let m = StreamMessage {
                                tick,
                                id: message_id,
                                dest: destination,
                                priority: priority.min(9),
                                reliability,
                                expiry_ms,
                                properties,
                                body,
                            };
                            match batch.as_mut() {
                                Some((id, msgs)) if *id == stream_id => msgs.push(m),
                                _ => {
                                    store_batch(messaging, peer_me, batch.take(), &mut replies)
                                        .await?;
                                    batch = Some((stream_id, vec![m]));
                                }
                            }
                        }
                        keel_bus::Delivery::Duplicate {
                            ack: keel_bus::Frame::Ack { stream_id, upto },
                        } => replies.push(LinkFrame::Ack { stream_id, upto }),
                        keel_bus::Delivery::Gap {
                            resend: keel_bus::Frame::Resend { stream_id, from },
                        } => replies.push(LinkFrame::Resend { stream_id, from }),
                        // Held or never announced: nothing of it is taken.
                        keel_bus::Delivery::UnknownStream => {}
                        other => {
                            return Err(LinkError::Protocol(format!(
                                "unexpected protocol answer {other:?}"
                            )))
                        }
                    }
                }
                LinkFrame::Get { req, queue, max } => {
                    replies.push(lend_messages(messaging, lent, req, queue, max).await);
                }
                LinkFrame::Settle {
                    req,
                    queue,
                    settles,
                } => {
                    replies.push(settle_lent(messaging, lent, req, queue, settles).await);
                }
                _ => return Err(LinkError::Protocol("a frame a target does not take".into())),
            }
        }
        store_batch(messaging, peer_me, batch.take(), &mut replies).await?;
        send_all(framed, replies).await?;
    }
}

/// The target's handshake on one stream of the peer: when this engine runs a FLUSH the peer
/// must first move the stream onto one made for it (FlushRequested, answered by `Flush`);
/// then the verdict. Ok(Some(why)) if the peer closed the link meanwhile.
pub(crate) async fn handshake<S: LinkIo>(
    messaging: &Messaging,
    ours: &str,
    peer_me: &str,
    mut s: StreamState,
    target: &mut keel_bus::Target,
    framed: &mut Framed<S, LinkCodec>,
) -> Result<Option<String>, LinkError> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    for _ in 0..=FLUSH_ROUNDS_MAX {
        let hello = keel_bus::Hello {
            stream_id: s.stream_id.clone(),
            next_tick: s.next_tick,
            acked: s.acked,
        };
        // A source whose own store went back is held even while this engine flushes: asking
        // it to flush would hide that (it must be FLUSH-started itself).
        let stored = messaging
            .in_state(peer_me, &s.stream_id)
            .await
            .map_err(LinkError::engine)?;
        let mut probe = keel_bus::Target::default();
        match &stored {
            Some(p) if p.retired_ms.is_some() => probe.discard(&s.stream_id),
            Some(p) => probe.restore(&s.stream_id, p.tick, p.identity.clone()),
            None => {}
        }
        let source_went_back = matches!(
            probe.on_hello(&hello),
            keel_bus::Verdict::SourceRestored { .. } | keel_bus::Verdict::Replaced
        );
        let known = if source_went_back {
            stored
        } else {
            match messaging
                .in_hello(
                    peer_me,
                    &s.stream_id,
                    s.flush_epoch.as_deref(),
                    s.resend_upto,
                )
                .await
                .map_err(LinkError::engine)?
            {
                InHello::FlushNeeded { epoch } => {
                    framed
                        .send(LinkFrame::Verdict {
                            stream_id: s.stream_id.clone(),
                            kind: VerdictKind::FlushRequested,
                            a: 0,
                            b: 0,
                            last_identity: None,
                            flush_epoch: Some(epoch),
                        })
                        .await
                        .map_err(LinkError::write)?;
                    match tokio::time::timeout(wait, framed.next()).await {
                        Ok(Some(Ok(LinkFrame::Flush { stream }))) => {
                            s = stream;
                            continue;
                        }
                        Ok(Some(Ok(LinkFrame::Close { reason }))) => {
                            return Ok(Some(format!("the peer closed it ({reason})")))
                        }
                        Ok(None) => return Ok(Some("the peer closed the connection".into())),
                        Ok(Some(Err(e))) => return Err(LinkError::Frame(e)),
                        Ok(Some(Ok(_))) => {
                            return Err(LinkError::Protocol(
                                "a flush request was not answered by Flush".into(),
                            ))
                        }
                        Err(_) => {
                            return Err(LinkError::Timeout {
                                what: "Flush",
                                ms: CONNECT_WAIT_MS,
                            })
                        }
                    }
                }
                InHello::Known(known) => known,
            }
        };
        match known {
            Some(p) if p.retired_ms.is_some() => target.discard(&s.stream_id),
            Some(p) => target.restore(&s.stream_id, p.tick, p.identity),
            None => {}
        }
        let verdict = target.on_hello(&hello);
        let (kind, a, b, last_identity) = match verdict {
            keel_bus::Verdict::Resume { from, last } => (VerdictKind::Resume, from, 0, last),
            keel_bus::Verdict::SourceRestored {
                target_prefix,
                source_next_tick,
            } => (
                VerdictKind::SourceRestored,
                target_prefix,
                source_next_tick,
                None,
            ),
            keel_bus::Verdict::TargetRestored {
                target_prefix,
                source_acked,
            } => (
                VerdictKind::TargetRestored,
                target_prefix,
                source_acked,
                None,
            ),
            keel_bus::Verdict::Replaced => (VerdictKind::Replaced, 0, 0, None),
        };
        if kind != VerdictKind::Resume {
            emit!(catalog::CWSIP0784E, receiver = ours, producer = peer_me);
            // Nothing of this stream is taken until a FLUSH replaces it.
            target.discard(&s.stream_id);
        }
        framed
            .send(LinkFrame::Verdict {
                stream_id: s.stream_id.clone(),
                kind,
                a,
                b,
                last_identity,
                flush_epoch: None,
            })
            .await
            .map_err(LinkError::write)?;
        return Ok(None);
    }
    Err(LinkError::Protocol(format!(
        "the peer's stream needed more than {FLUSH_ROUNDS_MAX} flushes"
    )))
}

/// Stores a batch of in-order messages of one stream with its new prefix, and queues its
/// ack. On a failure the in-memory prefix ran ahead of the store: the link ends, and the next
/// one starts from the store's prefix.
pub(crate) async fn store_batch(
    messaging: &Messaging,
    source: &str,
    batch: Option<(String, Vec<StreamMessage>)>,
    replies: &mut Vec<LinkFrame>,
) -> Result<(), LinkError> {
    let Some((stream_id, msgs)) = batch else {
        return Ok(());
    };
    let upto = msgs.last().expect("a batch is never empty").tick;
    messaging
        .in_deliver(source, &stream_id, msgs)
        .await
        .map_err(LinkError::engine)?;
    replies.push(LinkFrame::Ack { stream_id, upto });
    Ok(())
}

pub(crate) async fn send_all<S: LinkIo>(
    framed: &mut Framed<S, LinkCodec>,
    replies: Vec<LinkFrame>,
) -> Result<(), LinkError> {
    for r in replies {
        framed.feed(r).await.map_err(LinkError::write)?;
    }
    framed.flush().await.map_err(LinkError::write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn link_sockets_notice_a_dead_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        harden(&sock).unwrap();
        let s = socket2::SockRef::from(&sock);
        assert!(s.keepalive().unwrap());
        assert_eq!(
            s.tcp_keepalive_time().unwrap(),
            Duration::from_secs(KEEPALIVE_IDLE_S)
        );
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(USER_TIMEOUT_S))
        );
    }
}

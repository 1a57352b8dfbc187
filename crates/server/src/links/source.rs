//! The source side of a link: the verdict on its stream, FLUSH rounds, sending and acks, and
//! remote gets sent to the peer.
//!
//! The link reads apart from its writer (bounded by the window and `REMOTE_REQUESTS_MAX`
//! outstanding remote requests): both ends write bodies, and two ends that only write while the
//! other does not read would wait for each other for ever. Remote deliveries reach this engine's
//! consumers under loan numbers (`Messaging::next_loan`), mapped per link to the queue's seqs;
//! an answer whose consumer went away meanwhile is given back at once.

use super::*;

/// A remote get request sent on a link, waiting for its answer (answers come in order).
pub(crate) enum Waiting {
    /// Queue, messages asked for, the consumer's reply.
    Get(
        String,
        u32,
        tokio::sync::oneshot::Sender<Result<Vec<Delivery>, String>>,
    ),
    /// Settles asked, the positions of those sent (known loans), the reply.
    Settle(
        usize,
        Vec<usize>,
        tokio::sync::oneshot::Sender<Result<Vec<Result<(), String>>, String>>,
    ),
    /// A release this side sent for messages nobody wanted any more.
    Discard,
}

/// Times a FLUSH may be requested in one handshake (each for a new epoch: several engines
/// restored at once each ask once).
pub const FLUSH_ROUNDS_MAX: usize = 4;

/// A verdict as it travels: (kind, a, b, last identity, flush epoch).
pub(crate) type VerdictParts = (VerdictKind, u64, u64, Option<String>, Option<String>);

/// How a source announces its stream.
pub(crate) fn stream_state(st: &OutState) -> StreamState {
    StreamState {
        stream_id: st.stream_id().to_string(),
        next_tick: st.next_tick(),
        acked: st.acked(),
        flush_epoch: st.flush_epoch().map(str::to_string),
        resend_upto: st.resend_upto(),
    }
}

/// The peer's verdict on stream `stream_id`.
pub(crate) async fn read_verdict<S: LinkIo>(
    framed: &mut Framed<S, LinkCodec>,
    stream_id: &str,
) -> Result<VerdictParts, LinkError> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    match tokio::time::timeout(wait, framed.next()).await {
        Ok(Some(Ok(LinkFrame::Verdict {
            stream_id: id,
            kind,
            a,
            b,
            last_identity,
            flush_epoch,
        }))) if id == stream_id => Ok((kind, a, b, last_identity, flush_epoch)),
        Ok(Some(Ok(LinkFrame::Close { reason }))) => Err(LinkError::Refused(reason)),
        Ok(Some(Err(e))) => Err(LinkError::Frame(e)),
        Ok(_) => Err(LinkError::Protocol(
            "the peer did not answer for our delivery stream".into(),
        )),
        Err(_) => Err(LinkError::Timeout {
            what: "verdict",
            ms: CONNECT_WAIT_MS,
        }),
    }
}

/// What the source does with the target's verdict (keel-bus's `SourceState::resumption` and
/// `fork_check` decide): Ok(Ok(tick to send from)) after acknowledging what the target
/// already has, Ok(Err(why the stream is held)) when a store went back in time, or Err(why)
/// when this side failed (a store error: the link ends and is tried again, rather than
/// holding a stream that is fine).
pub(crate) async fn check_verdict(
    messaging: &Messaging,
    peer: &Peer,
    st: &OutState,
    (kind, a, b, last): (VerdictKind, u64, u64, Option<String>),
) -> Result<Result<u64, String>, LinkError> {
    let verdict = match kind {
        VerdictKind::SourceRestored => keel_bus::Verdict::SourceRestored {
            target_prefix: a,
            source_next_tick: b,
        },
        VerdictKind::TargetRestored => keel_bus::Verdict::TargetRestored {
            target_prefix: a,
            source_acked: b,
        },
        VerdictKind::Replaced => keel_bus::Verdict::Replaced,
        VerdictKind::Resume => keel_bus::Verdict::Resume { from: a, last },
        VerdictKind::FlushRequested => {
            return Err(LinkError::Protocol(
                "the peer asked for a flush once too often".into(),
            ))
        }
    };
    let held = |h: keel_bus::Held| Ok(Err(h.reason(&peer.me, st.stream_id())));
    let (from, check) = match st.resumption(&verdict) {
        keel_bus::Resumption::Hold(h) => return held(h),
        keel_bus::Resumption::Resume { from, check } => (from, check),
    };
    if let Some((tick, theirs)) = check {
        let ours = messaging
            .out_identity_at(&peer.me, tick)
            .await
            .map_err(LinkError::engine)?;
        if let Err(h) = st.fork_check(tick, ours.as_deref(), theirs.as_deref()) {
            return held(h);
        }
    }
    // The target has everything before `from`.
    messaging
        .out_acked(&peer.me, st.stream_id(), from - 1)
        .await
        .map_err(LinkError::engine)?;
    Ok(Ok(from))
}

/// Sends the stream's messages from `from` on (None: held, nothing is sent) and takes the
/// target's acks and resend requests until the link ends; returns why it ended. The target
/// has what it acknowledged durably, so the window moves with each ack at once; removing the
/// acknowledged rows here is left to the stream's committer (`OutStream::ack_later`), so
/// sending never waits for it.
pub(crate) async fn source_side<S: LinkIo>(
    messaging: &Messaging,
    peer: &Peer,
    stream: &OutStream,
    from: Option<u64>,
    framed: &mut Framed<S, LinkCodec>,
) -> String {
    // The peer's frames are read all the time, also while this side writes: the peer may be
    // writing (acks, remote get answers with message bodies) while it does not read, and two
    // sides that only write would wait for each other forever. What is read waits in a
    // channel bounded by what the protocol lets the peer have outstanding: an ack per window
    // of ticks and an answer per remote request (REMOTE_REQUESTS_MAX, each bounded by
    // GOT_BYTES_MAX).
    let (mut sink, mut source) = StreamExt::split(framed);
    let (inbound_tx, mut inbound) = tokio::sync::mpsc::channel(INBOUND_FRAMES_MAX);
    let reader = async move {
        while let Some(f) = source.next().await {
            if inbound_tx.send(f).await.is_err() {
                break;
            }
        }
    };
    let writer = source_loop(messaging, peer, stream, from, &mut sink, &mut inbound);
    tokio::pin!(reader, writer);
    let mut reading = true;
    loop {
        tokio::select! {
            why = &mut writer => return why,
            _ = &mut reader, if reading => reading = false,
        }
    }
}

/// Frames read ahead on a source link (see `source_side`).
pub(crate) const INBOUND_FRAMES_MAX: usize = 2 * STREAM_WINDOW as usize + REMOTE_REQUESTS_MAX;

pub(crate) type LinkSink<'a, S> =
    futures_util::stream::SplitSink<&'a mut Framed<S, LinkCodec>, LinkFrame>;
pub(crate) type Inbound = tokio::sync::mpsc::Receiver<Result<LinkFrame, keel_bus::link::LinkError>>;

pub(crate) async fn source_loop<S: LinkIo>(
    messaging: &Messaging,
    peer: &Peer,
    stream: &OutStream,
    from: Option<u64>,
    framed: &mut LinkSink<'_, S>,
    inbound: &mut Inbound,
) -> String {
    let st0 = stream.state().await;
    let stream_id = st0.stream_id().to_string();
    let mut peer_acked = st0.acked();
    let mut next_send = from;
    // Highest tick sent on this link: acks and resend requests beyond it are refused, so a
    // peer can never make this side forget messages it did not receive.
    let mut sent_upto = from.map_or(peer_acked, |f| f - 1);
    // Remote get requests of this engine's consumers, carried on this link while it is up.
    let mut remote_rx = messaging.attach_remote_link(&peer.me);
    let mut remote_open = true;
    let mut next_req: u64 = 1;
    let mut waiting: std::collections::VecDeque<(u64, Waiting)> = Default::default();
    // Deliveries lent over this link, by the loan number this engine's consumer sees as the
    // delivery's seq: a settle names a loan of this link, never a seq the queue's engine may
    // have lent again over a later link.
    let mut loans: HashMap<u64, u64> = HashMap::new();
    loop {
        if let Some(next) = next_send.as_mut() {
            let next_tick = stream.next_tick();
            // At most STREAM_WINDOW unacknowledged ticks in flight.
            while *next < next_tick && next.saturating_sub(peer_acked) <= STREAM_WINDOW {
                let room = (next_tick - *next)
                    .min((STREAM_WINDOW + peer_acked + 1).saturating_sub(*next))
                    .max(1);
                let n = usize::try_from(room)
                    .unwrap_or(usize::MAX)
                    .min(SEND_BATCH_MAX);
                let page = match messaging.out_page(&peer.me, &stream_id, *next, n).await {
                    Ok(p) if !p.is_empty() => p,
                    Ok(_) => break,
                    Err(e) => return e.to_string(),
                };
                for m in page {
                    *next = m.tick + 1;
                    sent_upto = sent_upto.max(m.tick);
                    let frame = LinkFrame::Data {
                        stream_id: stream_id.clone(),
                        tick: m.tick,
                        message_id: m.id,
                        priority: m.priority,
                        reliability: m.reliability,
                        expiry_ms: m.expiry_ms,
                        destination: m.dest,
                        properties: m.properties,
                        body: m.body,
                    };
                    if let Err(e) = framed.feed(frame).await {
                        return e.to_string();
                    }
                }
                if let Err(e) = framed.flush().await {
                    return e.to_string();
                }
            }
        }
        tokio::select! {
            f = inbound.recv() => match f {
                Some(Ok(LinkFrame::Ack { stream_id: id, .. } | LinkFrame::Resend { stream_id: id, .. })) if id != stream_id => {
                    return format!("the peer answered for stream {id}, not this link's stream {stream_id}");
                }
                Some(Ok(LinkFrame::Ack { upto, .. })) => {
                    if upto > sent_upto {
                        return format!("the peer acknowledged tick {upto}, which was not sent");
                    }
                    if upto > peer_acked {
                        peer_acked = upto;
                        stream.ack_later(&stream_id, upto);
                    }
                    // What the peer acknowledged was sent on this link, and never moves back.
                    assert!(peer_acked <= sent_upto, "acked {peer_acked} beyond sent {sent_upto}");
                }
                Some(Ok(LinkFrame::Resend { from, .. })) => {
                    if from <= peer_acked || from > sent_upto + 1 {
                        return format!("the peer asked to resend from tick {from}, outside {}..={}", peer_acked + 1, sent_upto + 1);
                    }
                    if let Some(next) = next_send.as_mut() {
                        *next = from;
                    }
                }
                Some(Ok(LinkFrame::Got { req, msgs, error })) => {
                    match waiting.pop_front() {
                        Some((r, Waiting::Get(queue, max, reply))) if r == req => {
                            if msgs.len() > usize::try_from(max).unwrap_or(usize::MAX) {
                                return format!("the peer answered remote get request {req} with {} messages, more than the {max} asked for", msgs.len());
                            }
                            let answer = match error {
                                Some(e) => Err(e),
                                None => Ok(msgs
                                    .into_iter()
                                    .map(|m| {
                                        let loan = messaging.next_loan();
                                        loans.insert(loan, m.seq);
                                        delivery_from(&queue, loan, m.id, m.priority, m.reliability, m.delivery_count, &m.properties, m.body)
                                    })
                                    .collect::<Vec<_>>()),
                            };
                            // The consumer gave up meanwhile (its link detached): give the
                            // messages back at once rather than leave them lent until this
                            // link ends.
                            if let Err(Ok(unwanted)) = reply.send(answer) {
                                if !unwanted.is_empty() {
                                    let req = next_req;
                                    next_req += 1;
                                    let settles = unwanted
                                        .iter()
                                        .filter_map(|d| loans.remove(&d.seq))
                                        .map(|seq| (seq, outcome_code(Outcome::Released)))
                                        .collect();
                                    if let Err(e) = framed.send(LinkFrame::Settle { req, queue, settles }).await {
                                        return e.to_string();
                                    }
                                    waiting.push_back((req, Waiting::Discard));
                                }
                            }
                        }
                        _ => return format!("the peer answered remote get request {req}, which was not the next one"),
                    }
                }
                Some(Ok(LinkFrame::Settled { req, results, error })) => {
                    match waiting.pop_front() {
                        Some((r, Waiting::Discard)) if r == req => {}
                        Some((r, Waiting::Settle(asked, at, reply))) if r == req => {
                            if error.is_none() && results.len() != at.len() {
                                return format!("the peer answered remote settle request {req} with {} results for {} deliveries", results.len(), at.len());
                            }
                            let _ = reply.send(match error {
                                Some(e) => Err(e),
                                None => {
                                    let mut all: Vec<Result<(), String>> = vec![Err("lent over a link that has ended: the queue's engine released it, and delivers it again".to_string()); asked];
                                    for (i, r) in at.into_iter().zip(results) {
                                        all[i] = r.map_or(Ok(()), Err);
                                    }
                                    Ok(all)
                                }
                            });
                        }
                        _ => return format!("the peer answered remote settle request {req}, which was not the next one"),
                    }
                }
                Some(Ok(LinkFrame::Close { reason })) => return format!("closed by the peer: {reason}"),
                Some(Ok(_)) => return "the peer sent a frame a source does not take".into(),
                Some(Err(e)) => return e.to_string(),
                None => return "the peer closed the connection".into(),
            },
            r = remote_rx.recv(), if remote_open && waiting.len() < REMOTE_REQUESTS_MAX => {
                let Some(r) = r else {
                    // A newer link took over the requests.
                    remote_open = false;
                    continue;
                };
                let req = next_req;
                next_req += 1;
                let (frame, w) = match r {
                    RemoteRequest::Get { queue, max, reply } => (
                        LinkFrame::Get { req, queue: queue.clone(), max },
                        Waiting::Get(queue, max, reply),
                    ),
                    RemoteRequest::Settle { queue, settles, reply } => {
                        // Loans of an earlier link are refused here: the queue's engine
                        // released them when that link ended.
                        let mut known = Vec::with_capacity(settles.len());
                        let mut at = Vec::with_capacity(settles.len());
                        for (i, (loan, o)) in settles.iter().enumerate() {
                            if let Some(seq) = loans.remove(loan) {
                                known.push((seq, outcome_code(*o)));
                                at.push(i);
                            }
                        }
                        (
                            LinkFrame::Settle { req, queue, settles: known },
                            Waiting::Settle(settles.len(), at, reply),
                        )
                    }
                };
                if let Err(e) = framed.send(frame).await {
                    return e.to_string();
                }
                waiting.push_back((req, w));
            }
            _ = stream.notify.notified() => {}
            _ = messaging.stopped() => return "this engine stopped".into(),
            // A bound on how long a missed wake-up can delay sending.
            _ = tokio::time::sleep(Duration::from_millis(SOURCE_POLL_MS)) => {}
        }
    }
}

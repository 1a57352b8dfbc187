//! Accepting a link: the header, the peer's `Open` and its checks, then the target side.

use super::*;

/// One engine this server hosts, as links see it.
pub(crate) struct Local {
    engine: Arc<Engine>,
    key: [u8; 32],
    /// Member engines of its bus, this one excluded, by name.
    peers: HashMap<String, Peer>,
}

/// Accepts links for the engines of one server.
pub struct LinkAcceptor {
    /// By bus name.
    local: HashMap<String, Local>,
}
impl LinkAcceptor {
    /// `shared_secret` is the profile's admin credential, from which each bus's key derives.
    pub fn new(
        cfg: &keel_config::Config,
        engines: &[Arc<Engine>],
        shared_secret: &[u8],
    ) -> LinkAcceptor {
        let mut local = HashMap::new();
        for e in engines {
            let bus = &e.config().bus;
            let peers = peers_of(cfg, e)
                .into_iter()
                .map(|p| (p.me.clone(), p))
                .collect();
            local.insert(
                bus.clone(),
                Local {
                    engine: e.clone(),
                    key: auth::link_key(shared_secret, bus),
                    peers,
                },
            );
        }
        LinkAcceptor { local }
    }

    /// As keel-amqp's link handler.
    pub fn handler(self: Arc<Self>) -> keel_amqp::LinkHandler {
        Arc::new(move |sock, peer, admitted| {
            let me = self.clone();
            Box::pin(async move { me.accept(sock, peer, admitted).await })
        })
    }

    async fn accept(
        &self,
        sock: keel_amqp::LinkSocket,
        peer: SocketAddr,
        mut admitted: keel_amqp::Admitted,
    ) {
        if let Err(e) = harden(sock.tcp()) {
            let why = format!("cannot set keepalive on the connection ({e})");
            return emit!(catalog::CWSIT0004W, peer = peer, me = "unknown", why = why);
        }
        let transport = if sock.is_tls() {
            Transport::Tls(sock.peer_process())
        } else {
            Transport::Plain
        };
        self.serve(sock, &peer.to_string(), transport, &mut || {
            admitted.authenticated()
        })
        .await
    }

    /// Serves one accepted connection (after its socket options are set): header, `Open`,
    /// checks, then the target side of the peer's streams until the link ends. Generic over
    /// the byte stream so simulations can drive it over a simulated network.
    /// `authenticated` is told when the peer's `Open` checked out (it moves the connection
    /// from the bus port's unauthenticated count to its links' pool, or refuses it).
    pub async fn serve<S: LinkIo>(
        &self,
        mut sock: S,
        peer: &str,
        transport: Transport,
        authenticated: &mut (dyn FnMut() -> Result<(), String> + Send),
    ) {
        let refuse = |me: &str, why: &str| {
            emit!(catalog::CWSIT0004W, peer = peer, me = me, why = why);
        };
        let mut head = [0u8; 8];
        // One deadline for the header and the Open together: a peer that has not proved
        // who it is holds a connection slot for OPEN_WAIT_MS at most.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(OPEN_WAIT_MS);
        match tokio::time::timeout_at(deadline, sock.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return refuse("unknown", "no complete protocol header"),
        }
        if let Err(e) = check_header(head) {
            return refuse("unknown", &e.to_string());
        }
        // Until the Open is checked, frames are bounded by OPEN_FRAME_BYTES_MAX.
        let mut framed = Framed::new(sock, LinkCodec::default());
        let open = match tokio::time::timeout_at(deadline, framed.next()).await {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => return refuse("unknown", &e.to_string()),
            Ok(None) => return refuse("unknown", "closed before its Open frame"),
            Err(_) => return refuse("unknown", "no Open frame in time"),
        };
        let LinkFrame::Open {
            bus,
            me,
            me_uuid,
            credential_proof,
            streams,
            ..
        } = open
        else {
            return refuse("unknown", "the first frame was not Open");
        };
        let verdict = self.check_open(&bus, &me, &me_uuid, &credential_proof, &transport);
        let local = match verdict {
            Ok(local) => local,
            Err(why) => {
                refuse(&me, &why);
                let _ = framed.send(LinkFrame::Close { reason: why }).await;
                return;
            }
        };
        if let Err(why) = authenticated() {
            refuse(&me, &why);
            let _ = framed.send(LinkFrame::Close { reason: why }).await;
            return;
        }
        framed.codec_mut().authenticated();
        emit!(
            catalog::CWSIT0005I,
            me = me,
            peer = peer,
            bus = bus,
            transport = transport
        );
        let incarnation = local.engine.info().await.map_or(0, |i| i.incarnation);
        let reply = open_frame(&local.key, local.engine.config(), incarnation, Vec::new());
        if framed.send(reply).await.is_err() {
            return emit!(catalog::CWSIT0006I, me = me, why = "the connection failed");
        }
        let why = match target_side(&local.engine, &me, streams, &mut framed).await {
            Ok(why) => why,
            Err(e) => {
                let why = e.to_string();
                let _ = framed
                    .send(LinkFrame::Close {
                        reason: why.clone(),
                    })
                    .await;
                why
            }
        };
        emit!(catalog::CWSIT0006I, me = me, why = why);
        let _ = framed.into_inner().shutdown().await;
    }

    /// The local engine a valid `Open` is for, or why it is refused.
    fn check_open(
        &self,
        bus: &str,
        me: &str,
        uuid: &str,
        proof: &[u8],
        transport: &Transport,
    ) -> Result<&Local, String> {
        let Some(local) = self.local.get(bus) else {
            return Err(format!(
                "it is an engine of bus {bus}, which this server has no engine on"
            ));
        };
        let ours = &local.engine.config().me;
        if me == ours {
            return Err(format!("it claims to be {me}, an engine of this server"));
        }
        let member = match local.peers.get(me) {
            None => return Err(format!("{me} is not a member of bus {bus}")),
            Some(known) if known.uuid != uuid => {
                return Err(format!(
                    "{me} has UUID {uuid}, but the bus's member {me} has UUID {}",
                    known.uuid
                ))
            }
            Some(known) => known,
        };
        // Over TLS the peer proves which process it is with its certificate (mutual TLS):
        // it must be the server that hosts the engine it claims to be.
        if let Transport::Tls(shown) = transport {
            let expected = (member.node.clone(), member.server.clone());
            match shown {
                None => return Err(format!("it linked over TLS without a client certificate; engine links need mutual TLS (the certificate of {}/{})", expected.0, expected.1)),
                Some(p) if *p != expected => {
                    return Err(format!(
                        "its certificate names process {}/{}, but {me} runs on {}/{}",
                        p.0, p.1, expected.0, expected.1
                    ))
                }
                Some(_) => {}
            }
        }
        auth::verify_proof(&local.key, proof, now_ms(), bus, me, uuid)
            .map_err(|e| e.to_string())?;
        if local.engine.state() != keel_engine::MeState::Started {
            return Err(format!("this server's engine {ours} is not started"));
        }
        Ok(local)
    }
}

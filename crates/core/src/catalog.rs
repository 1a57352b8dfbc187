//! The one message catalog: every log line with a message ID takes its text from here, and
//! `keel explain ID` prints the explanation and the user action.
//!
//! IDs follow `PREFIXnnnnS`: prefix by component (`CWSIP` messaging, `CWSIT` the AMQP endpoint, `WTRN` transactions,
//! `WSVR` server runtime, `ADMN` admin and node agent), four digits, and the severity letter
//! (`I`, `W`, `E`). IDs named by the seed procedures keep their meaning (`CWSIP0783E`,
//! `CWSIP0784E`, `WSVR0024I`, `WSVR0001I`). Text templates name fields in braces (`{server}`);
//! the log writer fills them from the event's fields.
//!
//! Log with `keel_core::emit!(catalog::WSVR0001I, server = name, pid = pid)`: the ID is a
//! constant here, so an unknown ID is a compile error. Tests keep the IDs unique, well formed
//! and matching their severity letter, and keep `docs/MESSAGES.md` equal to the catalog
//! (`KEEL_UPDATE_DOCS=1 cargo test -p keel-core catalog` regenerates it).

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn letter(self) -> char {
        match self {
            Severity::Info => 'I',
            Severity::Warning => 'W',
            Severity::Error => 'E',
        }
    }
}

#[derive(Debug)]
pub struct Msg {
    pub id: &'static str,
    pub severity: Severity,
    pub text: &'static str,
    pub explanation: &'static str,
    pub action: &'static str,
}

macro_rules! catalog {
    ($( $id:ident, $sev:ident, $text:expr, $expl:expr, $action:expr; )*) => {
        $( pub const $id: &Msg = &Msg {
            id: stringify!($id), severity: Severity::$sev, text: $text, explanation: $expl, action: $action,
        }; )*
        /// Every message, in catalog order.
        pub const ALL: &[&Msg] = &[ $( $id ),* ];
    };
}

catalog! {
    // --- server runtime -------------------------------------------------------------------
    WSVR0001I, Info, "Server {server} open for work (pid {pid}, admin port {admin_port}, bus port {bus_port}).",
        "The server finished starting: its endpoints are bound and it accepts work.",
        "None.";
    WSVR0024I, Info, "Server {server} stopped.",
        "The server shut down normally: every component stopped and the process is about to exit.",
        "None.";
    WSVR0100I, Info, "Server {server} starting in {mode} mode (pid {pid}, config version {config_version}).",
        "A server process began its start sequence.",
        "None. Look for WSVR0001I (open) or WSVR0101E (failed).";
    WSVR0101E, Error, "Server {server} could not start: {reason}",
        "A component of the server failed during start; the process exits with a non-zero status.",
        "Read the reason: fix the named file, port or permission, then start the server again.";
    WSVR0102I, Info, "Server {server} stopping ({reason}).",
        "The server began a normal shutdown.",
        "None. WSVR0024I follows when it is complete.";
    WSVR0103I, Info, "Server {server} started in recovery mode: it accepts no new work and stops when recovery is complete.",
        "A `--recovery` start runs only the services transaction recovery needs: no bus port, no applications.",
        "Wait for WSVR0105I and for the process to exit, then start the server normally.";
    WSVR0104E, Error, "Server {server} cannot start in recovery mode: it has no recovery logs under {path}.",
        "A recovery-mode start finishes in-doubt transactions recorded in the recovery logs; without logs there is nothing to recover (the last stop was clean, or the logs were moved).",
        "Start the server normally (`keel server start NAME`). If you moved the logs, put them back under the named directory first.";
    WSVR0105I, Info, "Server {server} finished recovery: {transactions} in-doubt transaction(s) resolved ({committed} branch(es) committed, {rolled_back} rolled back); the server stops now.",
        "Every transaction in the recovery logs reached an outcome at every resource and their locks are released. A transaction has a branch at each resource it used (the messaging engine, each data source), so there are more branches than transactions.",
        "None. Start the server normally when you are ready.";
    WSVR0106W, Warning, "Fault point names in KEEL_FAULTS are not known and will never fire: {points}.",
        "KEEL_FAULTS names fault points for crash tests; these names match no point in this build.",
        "Correct the names; `keel explain WSVR0106W` and docs/OPERATIONS.md list the points.";
    // --- transaction service and applications -----------------------------------------------
    WTRN0001I, Info, "Transaction service of server {server} started (recovery identity {recovery_id}, incarnation {incarnation}, resources {resources}); {decisions} logged decision(s) from earlier runs.",
        "The server's two-phase commit coordinator opened its recovery logs (tranlog and partnerlog). Logged decisions are transactions that committed while some branch was not told yet.",
        "None. Recovery finishes them; look for WTRN0004I.";
    WTRN0002I, Info, "Transaction recovery pass {pass} of server {server}: {committed} branch(es) committed, {rolled_back} rolled back, {pending} decision(s) waiting for a resource.",
        "Recovery asked every resource for the prepared branches of earlier runs of this server and finished them: committed where the decision was logged, rolled back otherwise (presumed abort). Passes repeat until one finds nothing.",
        "None while the numbers fall to zero. If decisions keep waiting, read the WTRN0003W lines: a resource is unreachable.";
    WTRN0003W, Warning, "Resource {resource} could not take part in transaction recovery: {reason}; trying again in {retry_s} s.",
        "A data source or messaging engine did not answer recovery. Its in-doubt branches keep their locks until it answers.",
        "Do what the reason says: for a data source, make it reachable (database running, URL and password right: `keel datasource list`); for a messaging engine, start it as the reason names (`keel me start ME`, with `--flush` when its data store was restored). Recovery retries by itself.";
    WTRN0004I, Info, "Transaction recovery of server {server} complete: {committed} branch(es) committed, {rolled_back} rolled back in {passes} pass(es); the locks in-doubt transactions held are released.",
        "Every transaction in doubt after an earlier run of this server reached its outcome at every resource.",
        "None.";
    WTRN0005W, Warning, "Resource {resource} is named in the partnerlog of server {server} but is not configured; its in-doubt branches cannot be finished until it is configured again or an operator resolves them.",
        "An earlier run of the server used this data source or messaging engine in transactions; the configuration no longer has it.",
        "Configure it again (same name) and restart the server, or resolve the transactions by hand with `keel tx list` and `keel tx commit|rollback XID`.";
    WTRN0006W, Warning, "Transaction {xid} was resolved by an operator ({outcome}): {detail}.",
        "`keel tx commit` or `keel tx rollback` finished a transaction's branches by hand. Against a logged decision this is a heuristic outcome: some branches may have been told otherwise.",
        "Check the data the transaction touched at every resource.";
    WTRN0007E, Error, "Transaction {xid} committed but some branches could not be told yet: {reason}.",
        "The commit decision is logged: recovery commits the remaining branches when their resources answer again.",
        "Make the named resource reachable; `keel tx list` shows the transaction until it is finished.";
    WTRN0008W, Warning, "Application {app}: message {id} from {dest} failed and its transaction rolled back: {reason}.",
        "The handler or one of the resources it used failed; nothing of the transaction was committed. The message counts a failed delivery: it is delivered again, and after the destination's max_failed_deliveries it moves to the exception destination.",
        "Fix the cause named (script error, statement, data source); messages on the exception destination can be moved back with `keel receive` / `keel send`.";
    WTRN0009I, Info, "Application {app} started on {dest} ({kind}, {concurrency} handler(s)).",
        "A message-driven application of the server receives from its destination; each message runs in one global transaction.",
        "None.";
    WTRN0010E, Error, "Application {app} cannot start: {reason}.",
        "The application's configuration, script, destination or data source is not usable; the server runs without it.",
        "Fix what is named, then restart the server.";
    WTRN0011I, Info, "Transaction service of server {server} stopped with empty recovery logs (the next start is a cold start).",
        "Every transaction finished before the server stopped, so the recovery logs hold nothing.",
        "None.";
    WTRN0012W, Warning, "Transaction service of server {server} stopped with its recovery logs kept: {what}; the next start (normal or `--recovery`) finishes whatever is in doubt.",
        "The server stopped before it knew that nothing was in doubt: a committed transaction has a branch not told yet (work in doubt), a resource no longer configured may hold branches, or recovery of an earlier run had not finished (a resource did not answer, or the stop came before recovery's passes completed), so whether anything is in doubt is not known. The logs are kept so that a later start can find out.",
        "Start the server again when the resource is reachable; `keel server start NAME --recovery` finishes them without taking new work.";
    WTRN0013E, Error, "Data source {datasource} cannot take part in two-phase commit: {reason}; no transaction begins on it until this is fixed.",
        "Every message an application handles with a data source is a two-phase transaction (the receive is a branch of the messaging engine), and PostgreSQL prepares a branch (PREPARE TRANSACTION) only when its setting max_prepared_transactions is above 0, which is not its default. The server checks this when it starts and on every new connection; rather than let each message fail at prepare and land on the exception destination, it begins no branch on the data source: messages that need it are released unchanged and their application backs off, as for an unreachable database.",
        "Set max_prepared_transactions in postgresql.conf (or `ALTER SYSTEM SET max_prepared_transactions = 100;`) to at least the number of transactions in flight at once (max_connections is safe), and restart PostgreSQL. The server picks it up on its next connection: no Keel restart needed. See docs/OPERATIONS.md.";
    WSVR0107W, Warning, "{dropped} log record(s) were not written to the log repository: its queue was full.",
        "The binary log repository is written off the hot path through a bounded queue; when events come faster than it writes, new records are dropped (SystemOut.log still has them) and counted.",
        "None usually. If it repeats, lower the log level (KEEL_LOG) or look at what logs so much; the LogRepository admin object shows the dropped count.";
    WSVR0108W, Warning, "{lost} log line(s) could not be written to {path} since {since} ({error}){kept}.",
        "Writing the process's SystemOut.log failed (most often a full disk). The writer kept going: it holds the first lines that failed in memory (a bounded number) and writes them, late and with their own times, as soon as a write succeeds; the rest are lost from this file (the log repository may still have them).",
        "Free space on the file system holding the logs. Nothing else: the log resumes by itself.";
    // --- admin API and node agent -----------------------------------------------------------
    ADMN0001I, Info, "Node agent of node {node} started (pid {pid}, admin port {admin_port}).",
        "The node agent is up and supervises the servers of its node.",
        "None.";
    ADMN0002I, Info, "Node agent of node {node} stopped.",
        "The node agent shut down on request. Servers it launched keep running unless they were stopped with it.",
        "None.";
    ADMN0003W, Warning, "Admin request {method} {path} from {peer} refused: {why}.",
        "Every admin request must carry the profile's admin credential (HTTP basic auth, user `admin`, password in secrets/admin-password). Refusals are logged within a budget (a burst, then 2 a second; a record says how many like it were left out), with the path clipped to 128 bytes.",
        "Use `keel admin` from the profile, or send the credential. Repeated refusals from an unknown peer may be an attack (ADMN0031W says when its answers are delayed).";
    ADMN0030W, Warning, "Admin endpoint connection from {peer}: {why}.",
        "The admin port caps its open connections in total and per source address, and closes connections that send no request in time. When a cap is reached, the connection idle longest is closed to make room; only when every open connection is in an authenticated request is a new one refused. These records are rate-limited: one says how many like it were not logged.",
        "None if the peer is known. Many from one address are a client opening connections without using them, or an attack; find the process (`ss -tnp`) and stop it. The limits are listed in docs/OPERATIONS.md (Limits and protections).";
    ADMN0031W, Warning, "Failed logins from {peer} as user {user}: {failures} in a row; every answer to it now waits {delay_ms} ms, doubling with each failure (at most {delay_max_ms} ms).",
        "After a few failed logins from one source address as one user (or many failures from one source as any user), Keel delays each further answer to that source, on the admin API and on the bus port alike, so guessing passwords costs time. Logged once when a burst starts, not for each attempt. The delay ends after a successful login or 15 minutes without failures.",
        "If the peer is yours, fix its credential (secrets/admin-password, or the user's password). Otherwise find and stop it; the delays already slow it down.";
    ADMN0040I, Info, "Made certificates {names} in {dir}: the profile had none for them (the cell's CA and one per node agent and server).",
        "Profiles made before certificates existed, and servers added since, get their certificates when the node agent starts: a CA for the cell (if missing) and a certificate per process signed by it, for TLS and mutual TLS (DESIGN \u{a7}10). Logged only when something was made.",
        "None. `keel cert show` lists them; operators who use their own CA replace the files and restart.";
    ADMN0041W, Warning, "Certificate {name} ({subject}) expires in {days} days, at {not_after}; renew it with `keel cert renew {name}`.",
        "A certificate of this node's processes, or the cell's CA, expires within 30 days (or has expired: a negative count). Checked when the node agent starts and once a day. A process with an expired certificate cannot be reached over TLS.",
        "Run `keel cert renew NAME` (or `keel cert renew --ca` for the CA, which re-issues every certificate) and restart the processes that use it.";
    ADMN0042W, Warning, "The certificates of node {node} could not be checked or made: {reason}.",
        "The node agent checks the profile's certificates (secrets/tls/) when it starts. It keeps running; listeners that need a certificate say so when they start.",
        "Fix what the reason names (usually the permissions of secrets/tls/), or remake them with `keel cert renew --ca`.";
    ADMN0043I, Info, "Made user {user} (Administrator) from the profile's admin password: the configuration had no users.",
        "Profiles made before users and roles existed (DESIGN \u{a7}10) get their first user the first time a `keel` command or the node agent opens them: `admin`, with the password of secrets/admin-password, stored as an Argon2id hash and a SCRAM-SHA-256 verifier. Said once: afterwards the configuration has users.",
        "None. `keel user list` shows the users; `keel user add` and `keel role grant` make more.";
    ADMN0010I, Info, "Launching server {server} in {mode} mode (attempt {attempt} of {max_attempts}).",
        "The node agent is starting a server process.",
        "None.";
    ADMN0011I, Info, "Server {server} is {how} (pid {pid}), {elapsed_ms} ms after launch.",
        "The server finished its start after launch: open for work in normal mode; in recovery mode it runs recovery only and takes no work.",
        "None.";
    ADMN0012W, Warning, "Server {server} (pid {pid}) ended unexpectedly: {status}.",
        "A server the node agent supervises exited without being asked to stop.",
        "Look in logs/{server}/SystemOut.log and native_stderr.log for the cause. The monitor policy decides whether it is restarted.";
    ADMN0013I, Info, "Restarting server {server} in normal mode as its monitor policy asks (auto_restart = true).",
        "The node agent restarts a crashed server automatically.",
        "None. If the server keeps crashing, find the cause in its logs.";
    ADMN0014W, Warning, "Server {server} is not restarted: {why}.",
        "The server ended and the node agent leaves it down.",
        "Start it with `keel server start NAME` when the cause is fixed.";
    ADMN0015E, Error, "Server {server} failed to start {attempts} time(s) in a row; the node agent stops trying: {reason}",
        "Each start attempt ended before the server opened for work; max_start_attempts of its monitor policy was reached.",
        "Read the reason and logs/{server}/native_stderr.log, fix the cause, then `keel server start NAME`.";
    ADMN0016W, Warning, "Server {server} (pid {pid}) did not answer its admin ping for {silent_ms} ms (ping timeout {timeout_ms} ms); killing it.",
        "A hung server is killed so that the monitor policy can restart it.",
        "Look in the server's logs for why it stopped responding.";
    ADMN0017I, Info, "Server {server} (pid {pid}) stopped on request{how}.",
        "A requested stop finished.",
        "None.";
    ADMN0018I, Info, "Recovery-mode server {server} (pid {pid}) ended: {status}; recovery-mode starts are never restarted.",
        "A `--recovery` start ends by itself when recovery is complete.",
        "If the status is not success, read the server's log; otherwise start the server normally.";
    ADMN0019I, Info, "Adopted running server {server} (pid {pid}) left by an earlier node agent.",
        "At start the node agent found a live server of its node and supervises it again.",
        "None.";
    ADMN0020I, Info, "Configuration of node {node} synchronized from version {from} to version {to}.",
        "The node's copy of the configuration now matches the master repository.",
        "Servers read configuration when they start: restart a running server to apply the change to it.";
    ADMN0021E, Error, "Configuration could not be synchronized to node {node}: {reason}",
        "The node keeps its previous copy of the configuration.",
        "Run `keel config validate`, fix the named file, then synchronize again with `--sync`.";
    // --- messaging engines and data stores ----------------------------------------------------
    CWSIP0100I, Info, "Messaging engine {me} starting in {mode} mode (data store {backend} {location}).",
        "A messaging engine began its start sequence.",
        "None. CWSIP0101I follows when it is started.";
    CWSIP0101I, Info, "Messaging engine {me} started (uuid {uuid}, incarnation {incarnation}, {messages} stored message(s)).",
        "The engine's data store is open and the engine accepts work.",
        "None.";
    CWSIP0102I, Info, "Messaging engine {me} stopped ({how}).",
        "The engine closed its data store; messages stay in the store.",
        "None. Start it with `keel me start ME`.";
    CWSIP0103E, Error, "Messaging engine {me} was not started: its data store was restored from a backup ({restored}), so a normal start could make other engines discard its new messages.",
        "A restored data store is behind the engines it exchanged messages with. Only a restart-after-restore (FLUSH) start resynchronises the delivery streams.",
        "Start the engine in restart-after-restore mode: `keel me start ME --flush`, or `AdminControl.invoke(me, \"start\", [\"FLUSH\"])` in `keel admin`.";
    CWSIP0104W, Warning, "Messaging engine {me} started in normal mode on a restored data store because the operator overrode the check.",
        "The restored mark was overridden (`--force-normal`); other engines may discard this engine's new messages until their streams are flushed.",
        "Stop the engine and start it with `--flush` unless you know no other engine exchanged messages with it.";
    CWSIP0105E, Error, "Messaging engine {me} could not start: {reason}",
        "The engine's data store could not be opened or checked; the engine stays stopped and the server keeps running.",
        "Read the reason: a store of another engine, a damaged file (restore from a backup), or a full disk.";
    CWSIP0106I, Info, "Messaging engine {me} is not started with its server: {why}.",
        "The server opened for work with this engine stopped.",
        "Start it when ready: `keel me start ME` (or with `--flush` after a restore).";
    CWSIP0107I, Info, "Data store of messaging engine {me} backed up to {path} ({bytes} bytes, {messages} message(s)).",
        "An online, consistent copy of the data store was written with its manifest.",
        "Keep the backup with the configuration backup taken at the same time.";
    CWSIP0108I, Info, "Messaging engine {me} in recovery-mode server: not started; its data store ({messages} stored message(s)) is open for transaction recovery only{flush}.",
        "A server started in recovery mode only resolves in-doubt transactions: it opens each engine's data store so that the engine's prepared branches can be finished, but the engine takes no work (no bus port, no links, no applications, no operator start). Restart-after-restore (FLUSH) is not done in recovery mode.",
        "After recovery completes and the server stops, start it normally and then start the engine with `--flush` if its store was restored.";
    CWSIP0109I, Info, "Messaging engine {me} began its restart-after-restore (FLUSH): {streams} outgoing delivery stream(s) moved to new streams with {messages} unacknowledged message(s) to resend; waiting for {waiting}.",
        "A FLUSH start gives every outgoing delivery stream a new identity and resends what is still on the transmission queues; each peer engine must also move its stream towards this engine onto a new one. The engine takes work meanwhile: new messages travel on the new streams.",
        "Start the peer engines named if they are stopped. CWSIP0783E follows when every peer has confirmed; `keel me state ME` shows what is still pending.";
    CWSIP0110I, Info, "Messaging engine {me}: {peer} confirmed the flush of {side}; waiting for {waiting}.",
        "One side of a restart-after-restore (FLUSH) was confirmed by a peer engine.",
        "None. CWSIP0783E follows when nothing is pending.";
    CWSIP0111I, Info, "Messaging engine {me} continues its restart-after-restore (FLUSH) that began before it stopped; waiting for {waiting}.",
        "The engine was FLUSH-started before and stopped before every peer confirmed; its data store says `flush-pending`, and a normal start carries on with the same flush.",
        "Start the peer engines named if they are stopped. CWSIP0783E follows when every peer has confirmed.";
    CWSIP0112W, Warning, "Data store of messaging engine {me}: the disk is full ({path}); changes are refused until space is freed, then resume by themselves.",
        "A write of the data store failed for lack of space (ENOSPC, SQLite's SQLITE_FULL). The change that failed was not stored and its sender was told so (AMQP `amqp:resource-limit-exceeded`); nothing acknowledged is lost. The engine stays started; its `store_health` attribute and `keel me state ME` say `disk-full`. Logged once when it starts, not once per refused change.",
        "Free space on the file system holding the path (remove files, or grow it). No restart is needed: CWSIP0113I follows when the first change fits again.";
    CWSIP0113I, Info, "Data store of messaging engine {me} is storing again: the disk had room after {refused} refused commit(s) since {since}.",
        "Space returned on the data store's file system and a commit succeeded; the engine takes work as before.",
        "None.";
    CWSIP0114E, Error, "Data store of messaging engine {me} has failed and takes no more work: {reason}.",
        "The store cannot tell what its files hold (an fsync of a commit failed, so that commit may or may not be on disk), found corruption while writing, or its writer stopped. Every change is refused with a sentence naming the remedy; the engine's state reads `failed`, its `store_health` attribute says why, and the server's `health` attribute reads `failed` until the engine is restarted.",
        "Check the disk (`dmesg`, free space, the device). Then restart the engine: `keel me stop ME` and `keel me start ME` (or restart its server). Opening the store recovers it from its files: a commit whose fsync failed is there whole or not at all. If the start reports corruption, restore the store from a backup (`keel store restore`).";
    // --- AMQP 1.0 endpoint on the bus port -------------------------------------------------------
    CWSIT0001I, Info, "AMQP 1.0 endpoint of server {server} listening on {address} ({tls}; SASL {mechanisms}; messaging engines {mes}).",
        "The bus port accepts AMQP 1.0 connections for the messaging engines this server hosts, plain (amqp://) and, when the server has its certificate, over TLS on the same port (amqps://): a connection that opens with a TLS record is AMQP over TLS, one that opens with the AMQP header is plain.",
        "None. Clients connect with SASL PLAIN as a profile user, or ANONYMOUS where the bus allows it; TLS clients trust the cell's CA (secrets/tls/ca.pem). If TLS is not offered, the note says why (usually a missing certificate: `keel cert renew --all`).";
    CWSIT0002W, Warning, "AMQP connection from {peer} refused: {why}.",
        "A client could not open an AMQP connection: failed authentication, a protocol error before the connection opened, no header, login and open within the 5 s deadline, or a cap reached (256 unauthenticated connections, 32 from one source address, 1 024 authenticated clients). Refusals are logged within a budget (a burst, then 2 a second); a record says how many like it were left out.",
        "Check the client's user and password (the profile's `secrets/admin-password` for user admin) and that it speaks AMQP 1.0 with SASL. Many refusals from one address are a client that opens connections without using them, or an attack: find the process (`ss -tnp`) and stop it. docs/OPERATIONS.md (Limits and protections) lists the caps.";
    CWSIT0003W, Warning, "AMQP link {link} from {peer} refused: {why}.",
        "A client attached a link to an address this server cannot serve: an undefined destination, one held by another messaging engine, a stopped engine, or an anonymous client on a bus that requires authentication.",
        "Create the destination (`keel destination create`), connect to the server whose engine holds it, or start the engine (`keel me start`).";
    CWSIT0004W, Warning, "Messaging engine link from {peer} (engine {me}) refused: {why}.",
        "Another process opened an ME-to-ME link on the bus port but was not let in: it names another bus or an engine that is not a member of this bus, its credential does not match this bus's link key, or its frames are malformed. Nothing it sent was taken.",
        "Check that both servers belong to the same profile and bus (`keel bus show`), that the engine is a member (`keel bus add-member`), and that the two machines' clocks agree within two minutes.";
    CWSIT0005I, Info, "Messaging engine link from {me} at {peer} accepted for bus {bus} ({transport}).",
        "A member engine of the bus opened an ME-to-ME link and proved its credential: over mutual TLS, its certificate names the server that hosts it; plain TCP is accepted from loopback addresses only.",
        "None.";
    CWSIT0006I, Info, "Messaging engine link from {me} closed: {why}.",
        "An accepted ME-to-ME link ended.",
        "None if the peer was stopped; otherwise look at the peer server's log.";
    CWSIT0007I, Info, "Messaging engine {me} linked to messaging engine {peer} at {address} ({transport}).",
        "This server's engine opened an ME-to-ME link to a member engine of its bus and checked that engine's credential (over mutual TLS when this server has its certificate: the peer's certificate must name the address called and the server that hosts the engine).",
        "None.";
    CWSIT0008W, Warning, "Messaging engine {me} has no link to messaging engine {peer} at {address}: {why}; retrying with back-off.",
        "The link to another member engine of the bus could not be opened or was lost. This server keeps trying (from 0.1 s up to every 10 s) and logs again only when the reason changes.",
        "Start the peer's server and engine if they are stopped; otherwise check the reason: a refusal names what the peer did not accept.";
    CWSIT0009E, Error, "Delivery stream {stream} from messaging engine {me} to messaging engine {peer} is held: {why}.",
        "The two engines' records of the stream disagree in a way only a data store that went back in time causes (a restore, or a store file copied back). Nothing is dropped: new messages wait on the transmission queue of the sending engine.",
        "Start the engine whose store was restored with `keel me start ME --flush` (DESIGN §5, docs/OPERATIONS.md).";
    CWSIT0010I, Info, "Delivery stream {stream} from messaging engine {me} to messaging engine {peer} flushed for the restart-after-restore of {peer} (flush {epoch}): {messages} unacknowledged message(s) move to new stream {new} and are resent.",
        "The peer engine was started in restart-after-restore (FLUSH) mode and asked this engine to move its stream towards it onto a new stream. Messages the peer lost with its restore and that this engine still holds are resent; the peer drops those it already has.",
        "None.";
    // --- messaging (named by the restore procedure) ----------------------------------------------
    CWSIP0783E, Error, "Messaging engine {me} started; flush of all delivery streams completed.",
        "The engine was started in restart-after-restore (FLUSH) mode and every peer confirmed the new delivery streams. New messages are neither lost nor duplicated from here on.",
        "None. The `restored` mark of the data store is cleared; later starts are normal starts.";
    CWSIP0784E, Error, "Messaging engine {receiver} received a message from messaging engine {producer} that was not expected.",
        "The delivery stream state of the two engines disagrees in a way only a data store that went back in time can cause (a backup was restored). The stream is held: nothing is dropped, new messages wait in the producer's store.",
        "Stop the messaging engine whose store was restored and start it in restart-after-restore mode (`keel me start ME --flush`). Do this only if you know a backup was restored.";
}

/// Finds a message by ID, case-insensitively (operators type IDs by hand).
pub fn lookup(id: &str) -> Option<&'static Msg> {
    ALL.iter()
        .copied()
        .find(|m| m.id.eq_ignore_ascii_case(id.trim()))
}

/// Fills `{field}` placeholders from `fields`; unknown placeholders stay as written, so a
/// missing field shows up in the log instead of vanishing.
pub fn render(text: &str, fields: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let key = &after[..close];
                match fields.iter().find(|(k, _)| *k == key) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        out.push('{');
                        out.push_str(key);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Logs a catalog message at its severity with the given fields (each must be `Display`).
/// The log writer renders the catalog text from the fields; structured sinks keep the fields.
#[macro_export]
macro_rules! emit {
    ($msg:expr $(, $k:ident = $v:expr)* $(,)?) => {{
        let m: &'static $crate::catalog::Msg = $msg;
        match m.severity {
            $crate::catalog::Severity::Info =>
                $crate::tracing::info!(msg_id = m.id $(, $k = %$v)*),
            $crate::catalog::Severity::Warning =>
                $crate::tracing::warn!(msg_id = m.id $(, $k = %$v)*),
            $crate::catalog::Severity::Error =>
                $crate::tracing::error!(msg_id = m.id $(, $k = %$v)*),
        }
    }};
}

/// The catalog as Markdown: `docs/MESSAGES.md` is this text (a test keeps them equal).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Keel message catalog\n\nGenerated from `crates/core/src/catalog.rs` (the one catalog); `keel explain ID` prints the same.\nRegenerate with `KEEL_UPDATE_DOCS=1 cargo test -p keel-core catalog`.\n",
    );
    for m in ALL {
        let sev = match m.severity {
            Severity::Info => "informational",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        out.push_str(&format!(
            "\n## {}\n\n{} ({sev})\n\n- Explanation: {}\n- User action: {}\n",
            m.id, m.text, m.explanation, m.action
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_messages_md_matches_the_catalog() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/MESSAGES.md");
        let want = markdown();
        if std::env::var("KEEL_UPDATE_DOCS").is_ok() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(have == want, "docs/MESSAGES.md is out of date: run `KEEL_UPDATE_DOCS=1 cargo test -p keel-core catalog`");
    }

    #[test]
    fn ids_are_unique_well_formed_and_match_their_severity() {
        let prefixes = ["CWSIP", "CWSIT", "WTRN", "WSVR", "ADMN"];
        for (i, m) in ALL.iter().enumerate() {
            assert!(
                ALL[i + 1..].iter().all(|o| o.id != m.id),
                "duplicate id {}",
                m.id
            );
            let prefix = prefixes
                .iter()
                .find(|p| m.id.starts_with(**p))
                .unwrap_or_else(|| panic!("{} has no known prefix", m.id));
            let digits = &m.id[prefix.len()..m.id.len() - 1];
            assert_eq!(digits.len(), 4, "{}", m.id);
            assert!(digits.chars().all(|c| c.is_ascii_digit()), "{}", m.id);
            assert_eq!(
                m.id.chars().last(),
                Some(m.severity.letter()),
                "{} severity letter",
                m.id
            );
            assert!(
                !m.explanation.is_empty() && !m.action.is_empty(),
                "{} needs explanation and action",
                m.id
            );
        }
    }

    #[test]
    fn render_fills_known_fields_and_keeps_unknown_ones() {
        let s = render(
            "Server {server} open ({pid}) {missing} {",
            &[("server", "s1".into()), ("pid", "42".into())],
        );
        assert_eq!(s, "Server s1 open (42) {missing} {");
    }

    #[test]
    fn lookup_is_case_insensitive() {
        assert_eq!(lookup("wsvr0001i").map(|m| m.id), Some("WSVR0001I"));
        assert!(lookup("NOPE0000I").is_none());
    }
}

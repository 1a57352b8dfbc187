//! The reader thread and its queries: paging in delivery order, per-stream reads, bodies
//! filled in from the body log, the store's account of itself. Bounded: no read returns more
//! than a page.

use rusqlite::{params, Connection};
use tokio::sync::mpsc;

use super::schema::read_meta;
use super::{Ctx, ReadReq};
use crate::bodylog::{BodyRef, Segments};
use crate::commit::check_limit;
use crate::error::Result;
use crate::{StoreInfo, StoredMessage};

pub(super) const SELECT_COLS: &str = "dest, seq, id, priority, reliability, expiry_ms, delivery_count, \
                           properties, body, stream_id, tick, body_seg, body_at, body_len, body_crc";
/// Rows read per step when a backup or a verify walks the body log.
const BODY_WALK_ROWS: i64 = 1_024;

pub(super) fn count_messages(conn: &Connection, ctx: &Ctx) -> Result<u64> {
    let n: i64 = conn
        .query_row("SELECT coalesce(sum(depth), 0) FROM dests", [], |r| {
            r.get(0)
        })
        .map_err(ctx.err("count messages"))?;
    assert!(n >= 0);
    Ok(n as u64)
}

/// A row of `SELECT_COLS`: the message, and where its body is when it is in the body log (the
/// `body` column is then empty).
fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredMessage, Option<BodyRef>)> {
    let stream_id: Option<String> = r.get(9)?;
    let tick: Option<i64> = r.get(10)?;
    let body_ref = body_ref_at(r, 11)?;
    let message = StoredMessage {
        dest: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        id: r.get(2)?,
        priority: r.get(3)?,
        reliability: r.get(4)?,
        expiry_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        delivery_count: r.get(6)?,
        properties: r.get(7)?,
        body: r.get(8)?,
        stream: stream_id.zip(tick.map(|t| t as u64)),
    };
    Ok((message, body_ref))
}

/// The body reference in columns `first..first + 4` (body_seg, body_at, body_len, body_crc).
pub(super) fn body_ref_at(
    r: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<Option<BodyRef>> {
    let seg: Option<i64> = r.get(first)?;
    let Some(seg) = seg else {
        return Ok(None);
    };
    Ok(Some(BodyRef {
        seg: seg as u64,
        at: r.get::<_, i64>(first + 1)? as u64,
        len: r.get(first + 2)?,
        crc: r.get(first + 3)?,
    }))
}

/// Walks the messages whose body is in the body log, `BODY_WALK_ROWS` at a time in seq
/// order, handing each step's rows and bodies (CRC-checked) to `each`. Bounded memory.
pub(super) fn walk_logged_bodies(
    conn: &Connection,
    ctx: &Ctx,
    bodies: &Segments,
    mut each: impl FnMut(&[(i64, BodyRef)], Vec<Vec<u8>>) -> Result<()>,
) -> Result<()> {
    let mut after = i64::MIN;
    loop {
        let rows = logged_rows_after(conn, ctx, after)?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(());
        };
        assert!(last > after, "the walk moves forward");
        let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
        let read = bodies.read(&refs).map_err(|e| ctx.body_err(e))?;
        each(&rows, read)?;
        after = last;
    }
}

/// Up to `BODY_WALK_ROWS` messages after seq `after` whose body is in the body log.
pub(super) fn logged_rows_after(
    conn: &Connection,
    ctx: &Ctx,
    after: i64,
) -> Result<Vec<(i64, BodyRef)>> {
    let rows = conn
        .prepare_cached(
            "SELECT seq, body_seg, body_at, body_len, body_crc FROM messages \
             WHERE seq > ?1 AND body_seg IS NOT NULL ORDER BY seq LIMIT ?2",
        )
        .and_then(|mut st| {
            st.query_map(params![after, BODY_WALK_ROWS], |r| {
                Ok((r.get(0)?, body_ref_at(r, 1)?.expect("body_seg is set")))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(ctx.err("read body references"))?;
    assert!(rows.len() <= BODY_WALK_ROWS as usize);
    assert!(rows.iter().all(|(seq, _)| *seq > after));
    Ok(rows)
}

/// Fills in the bodies that live in the body log.
fn fill_bodies(
    ctx: &Ctx,
    rows: Vec<(StoredMessage, Option<BodyRef>)>,
) -> Result<Vec<StoredMessage>> {
    let refs: Vec<BodyRef> = rows.iter().filter_map(|(_, r)| *r).collect();
    if refs.is_empty() {
        return Ok(rows.into_iter().map(|(m, _)| m).collect());
    }
    let mut bodies = ctx
        .bodies
        .read(&refs)
        .map_err(|e| ctx.body_err(e))?
        .into_iter();
    let out: Vec<StoredMessage> = rows
        .into_iter()
        .map(|(mut m, r)| {
            if r.is_some() {
                assert!(m.body.is_empty(), "a body both in its row and in the log");
                m.body = bodies.next().expect("one body per reference");
            }
            m
        })
        .collect();
    assert!(bodies.next().is_none());
    Ok(out)
}

pub(super) fn query_messages(
    conn: &Connection,
    ctx: &Ctx,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<StoredMessage>> {
    // Pinned from before the statement's snapshot until the bodies are read.
    let _pin = ctx.bodies.pin();
    let mut stmt = conn.prepare_cached(sql).map_err(ctx.err("prepare read"))?;
    let rows = stmt
        .query_map(params, row_to_message)
        .map_err(ctx.err("read messages"))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(ctx.err("read messages"))?;
    fill_bodies(ctx, rows)
}

pub(super) fn page_impl(
    conn: &Connection,
    ctx: &Ctx,
    dest: &str,
    after: Option<(u8, u64)>,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    check_limit(&ctx.me, limit)?;
    // Two index range scans instead of one OR: the rest of the cursor's priority, then the
    // lower priorities. Each uses (dest, priority DESC, seq) without sorting.
    let mut out = match after {
        None => Vec::new(),
        Some((p, s)) => query_messages(
            conn,
            ctx,
            &format!(
                "SELECT {SELECT_COLS} FROM messages WHERE dest = ?1 AND priority = ?2 AND seq > ?3 \
                 ORDER BY seq LIMIT ?4"
            ),
            params![dest, p, s as i64, limit as i64],
        )?,
    };
    if out.len() < limit {
        let below: i64 = after.map_or(10, |(p, _)| i64::from(p));
        let rest = query_messages(
            conn,
            ctx,
            &format!(
                "SELECT {SELECT_COLS} FROM messages WHERE dest = ?1 AND priority < ?2 \
                 ORDER BY priority DESC, seq LIMIT ?3"
            ),
            params![dest, below, (limit - out.len()) as i64],
        )?;
        out.extend(rest);
    }
    // Read back, assert: delivery order, strictly after the cursor, bounded.
    assert!(out.len() <= limit);
    let mut prev = after;
    for m in &out {
        assert_eq!(m.dest, dest);
        if let Some((p, s)) = prev {
            assert!(
                m.priority < p || (m.priority == p && m.seq > s),
                "page out of delivery order"
            );
        }
        prev = Some((m.priority, m.seq));
    }
    Ok(out)
}

pub(super) fn reader_loop(conn: Connection, mut rx: mpsc::Receiver<ReadReq>) {
    while let Some(req) = rx.blocking_recv() {
        match req {
            ReadReq::Job(job) => job(&conn),
            ReadReq::Close { reply } => {
                drop(conn);
                let _ = reply.send(());
                return;
            }
        }
    }
}

pub(super) fn info_of(conn: &Connection, ctx: &Ctx) -> Result<StoreInfo> {
    let meta = read_meta(conn, ctx)?;
    Ok(StoreInfo {
        me: meta.me,
        uuid: meta.uuid,
        backend: "sqlite",
        location: ctx.file.display().to_string(),
        restore_state: meta.restore_state,
        messages: count_messages(conn, ctx)?,
        schema_version: meta.schema_version,
        incarnation: meta.incarnation,
    })
}

//! `keel logs view`: reads a process's binary log repository (`logs/<process>/repository/`,
//! keel-logs `repo`) with filters, as text, JSON lines or the advanced format; `--follow` keeps
//! reading as records arrive, also across restarts of the process (each start writes a new
//! segment). Works whether the process runs or not: it reads the files.

use std::collections::VecDeque;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use keel_logs::repo::{self, Position, Query, ReadReport, Record};

use crate::choices::{Level, LogFormat};
use crate::ctx::Ctx;

#[derive(Subcommand, Debug)]
pub enum LogsCmd {
    /// Show records of a server's or the node agent's log repository.
    View(ViewArgs),
}

#[derive(Args, Debug)]
pub struct ViewArgs {
    /// The server whose log to read (default: the node's only server).
    #[arg(long, conflicts_with = "node")]
    server: Option<String>,
    /// Read the node agent's log of this node instead.
    #[arg(long)]
    node: Option<String>,
    /// Least severe level shown (warn = warnings and errors).
    #[arg(long, value_enum, ignore_case = true)]
    min_level: Option<Level>,
    /// Most severe level shown (info = no warnings or errors).
    #[arg(long, value_enum, ignore_case = true)]
    max_level: Option<Level>,
    /// From this time: RFC 3339 (`2026-11-25T10:00:00Z`) or an age (`10m`, `2h`, `1day`).
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (same forms).
    #[arg(long)]
    until: Option<String>,
    /// Only these message IDs (comma separated).
    #[arg(long = "message", value_delimiter = ',')]
    message: Vec<String>,
    /// Only this component and those under it (`engine`, `server.txsvc`).
    #[arg(long)]
    logger: Option<String>,
    /// Only this thread number (the hex column of a line, e.g. 0000001a or 26).
    #[arg(long)]
    thread: Option<String>,
    /// Only records whose text contains this.
    #[arg(long)]
    contains: Option<String>,
    /// Only the last N matching records (then, with --follow, what comes).
    #[arg(long)]
    tail: Option<usize>,
    /// Keep reading as records arrive, across restarts of the process (Ctrl-C ends).
    #[arg(long)]
    follow: bool,
    /// How each record is written.
    #[arg(long, value_enum, default_value = "text")]
    format: LogFormat,
    /// The same as --format json: one JSON object per line.
    #[arg(long, conflicts_with = "format")]
    json: bool,
}

/// Records `--tail` may hold at once.
const TAIL_MAX: usize = 1_000_000;
/// How often `--follow` looks for new records.
const FOLLOW_POLL_MS: u64 = 200;

fn parse_time(what: &str, s: &str) -> Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        return Ok(now.saturating_sub(d.as_millis() as u64));
    }
    bail!("--{what} {s}: give a time as RFC 3339 (2026-11-25T10:00:00Z) or an age (10m, 2h, 1day)")
}

fn time_text(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn render(r: &Record, format: LogFormat) -> String {
    match format {
        LogFormat::Json => serde_json::json!({
            "time": time_text(r.time_ms),
            "time_ms": r.time_ms,
            "level": r.level_name(),
            "process": r.process,
            "thread": format!("{:08x}", r.thread),
            "logger": r.logger,
            "id": r.id,
            "text": r.text,
            "fields": r
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
        })
        .to_string(),
        LogFormat::Advanced => {
            let mut line = format!(
                "[{}] {:08x} {:<5} {}/{} {} {}",
                time_text(r.time_ms),
                r.thread,
                r.level_name(),
                r.process,
                r.logger,
                r.id.as_deref().unwrap_or("-"),
                r.text
            );
            for (k, v) in &r.fields {
                line.push_str(&format!(" {k}={v:?}"));
            }
            line.replace('\n', "\\n")
        }
        LogFormat::Text => {
            let letter = r.level_name().chars().next().unwrap_or('I');
            let id =
                r.id.as_deref()
                    .map(|i| format!("{i}: "))
                    .unwrap_or_default();
            format!(
                "[{}] {:08x} {} {letter} {id}{}",
                time_text(r.time_ms),
                r.thread,
                r.logger,
                r.text
            )
            .replace('\n', "\\n")
        }
    }
}

/// A reader that went away (`| head`) ends the command normally; other write errors are errors.
fn broken_pipe_is_success(e: std::io::Error) -> Result<ExitCode> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(e.into())
    }
}

pub fn run(ctx: &Ctx, cmd: LogsCmd) -> Result<ExitCode> {
    let LogsCmd::View(a) = cmd;
    let format = if a.json { LogFormat::Json } else { a.format };
    let profile = ctx.profile()?;
    let (node, cfg) = ctx.config(&profile)?;
    let process = match (&a.server, &a.node) {
        (_, Some(n)) if *n == node => keel_core::layout::NODE_AGENT.to_string(),
        (_, Some(n)) => bail!("there is no node {n} in this profile (its node is {node})"),
        (Some(s), None) => {
            if cfg.find_server(s).is_none() {
                let known: Vec<&str> = cfg
                    .nodes
                    .iter()
                    .flat_map(|n| n.servers.iter().map(|s| s.name.as_str()))
                    .collect();
                bail!(
                    "there is no server {s} (servers: {}); `keel server create {s}` makes one",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                );
            }
            s.clone()
        }
        (None, None) => {
            let servers: Vec<&str> = cfg
                .node(&node)
                .map(|n| n.servers.iter().map(|s| s.name.as_str()).collect())
                .unwrap_or_default();
            match servers.as_slice() {
                [one] => one.to_string(),
                _ => bail!(
                    "give --server NAME (servers: {}) or --node {node}",
                    servers.join(", ")
                ),
            }
        }
    };
    let thread = match &a.thread {
        None => None,
        Some(t) => {
            // As a line shows it (8 hex digits), 0x-prefixed hex, or a decimal number.
            let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"));
            let parsed = match hex {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None if t.len() == 8 => u32::from_str_radix(t, 16).ok(),
                None => t.parse().ok(),
            };
            Some(parsed.ok_or_else(|| {
                anyhow!("--thread {t}: give the thread as in a line (0000001a), as 0x1a, or as a number")
            })?)
        }
    };
    let q = Query {
        since_ms: a
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?,
        until_ms: a
            .until
            .as_deref()
            .map(|s| parse_time("until", s))
            .transpose()?,
        min_level: a.min_level.map(Level::number),
        max_level: a.max_level.map(Level::number),
        ids: a
            .message
            .iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        logger: a.logger.clone(),
        thread,
        contains: a.contains.clone(),
    };
    if let (Some(least), Some(most)) = (q.min_level, q.max_level) {
        if most > least {
            bail!("--max-level is less severe than --min-level: no record can match (--min-level is the least severe level shown, --max-level the most severe)");
        }
    }
    let dir = keel_logs::repository_dir(profile.layout(), &process);
    if !dir.is_dir() && !a.follow {
        bail!(
            "process {process} has no log repository yet ({} does not exist): it has not run with this version of Keel; read its SystemOut.log beside that directory, or start it once",
            dir.display()
        );
    }
    let mut pos = Position::default();
    let mut report = ReadReport::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let tail = a.tail.map(|n| n.min(TAIL_MAX));
    if let Some(n) = tail {
        let mut last: VecDeque<Record> = VecDeque::with_capacity(n.min(4096));
        repo::read(&dir, &q, &mut pos, &mut report, &mut |r| {
            if n > 0 {
                if last.len() == n {
                    last.pop_front();
                }
                last.push_back(r);
            }
            true
        })?;
        for r in &last {
            if let Err(e) = writeln!(out, "{}", render(r, format)) {
                return broken_pipe_is_success(e);
            }
        }
    } else {
        let mut failed = None;
        repo::read(&dir, &q, &mut pos, &mut report, &mut |r| match writeln!(
            out,
            "{}",
            render(&r, format)
        ) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        })?;
        if let Some(e) = failed {
            return broken_pipe_is_success(e);
        }
    }
    if let Err(e) = out.flush() {
        return broken_pipe_is_success(e);
    }
    if !a.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        std::thread::sleep(Duration::from_millis(FOLLOW_POLL_MS));
        let mut broken = false;
        repo::read(&dir, &q, &mut pos, &mut report, &mut |r| {
            if writeln!(out, "{}", render(&r, format)).is_err() {
                broken = true;
                return false;
            }
            true
        })?;
        if broken || out.flush().is_err() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_take_rfc3339_or_an_age() {
        assert_eq!(
            parse_time("since", "2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        let ten_min_ago = parse_time("since", "10m").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now - ten_min_ago >= 600_000 && now - ten_min_ago < 660_000);
        assert!(parse_time("since", "yesterday-ish").is_err());
    }

    #[test]
    fn formats_render_a_record() {
        let r = Record {
            time_ms: 1_700_000_000_123,
            level: 3,
            process: "server1".into(),
            thread: 26,
            logger: "server".into(),
            id: Some("WSVR0024I".into()),
            text: "Server server1 stopped.".into(),
            fields: vec![("server".into(), "server1".into())],
        };
        assert_eq!(
            render(&r, LogFormat::Text),
            "[2023-11-14T22:13:20.123Z] 0000001a server I WSVR0024I: Server server1 stopped."
        );
        let j: serde_json::Value = serde_json::from_str(&render(&r, LogFormat::Json)).unwrap();
        assert_eq!(j["id"], "WSVR0024I");
        assert_eq!(j["level"], "INFO");
        assert_eq!(j["fields"]["server"], "server1");
        assert!(render(&r, LogFormat::Advanced).contains("server1/server WSVR0024I"));
    }
}

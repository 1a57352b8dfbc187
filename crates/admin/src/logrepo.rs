//! The `LogRepository` admin object of a process (server or node agent): its binary log
//! repository's size, segments, oldest record, and what its writer wrote, dropped and failed.

use crate::{AdminObject, OpFuture, Value};
use keel_core::ObjectName;
use serde_json::json;
use std::sync::atomic::Ordering;

pub struct LogRepositoryObject {
    name: ObjectName,
    process: String,
    writer: &'static keel_logs::repo::RepoWriter,
}

impl LogRepositoryObject {
    /// None when this process has no repository (logging was not set up with one).
    pub fn new(node: &str, process: &str) -> Option<LogRepositoryObject> {
        Some(LogRepositoryObject {
            name: ObjectName::new(&[
                ("type", "LogRepository"),
                ("name", process),
                ("node", node),
                ("process", process),
            ]),
            process: process.to_string(),
            writer: keel_logs::repository()?,
        })
    }

    fn state(&self) -> Value {
        let (size, segments, oldest) =
            keel_logs::repo::summary(&self.writer.dir).unwrap_or((0, 0, None));
        let s = &self.writer.stats;
        json!({
            "process": self.process,
            "path": self.writer.dir.display().to_string(),
            "size_bytes": size,
            "segments": segments,
            "oldest_ms": oldest,
            "oldest": oldest.map(|ms| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()),
            "written": s.written.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
            "blocks": s.blocks.load(Ordering::Relaxed),
            "write_errors": s.write_errors.load(Ordering::Relaxed),
        })
    }
}

impl AdminObject for LogRepositoryObject {
    fn name(&self) -> ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, Value> {
        crate::attribute_map(self.state())
    }

    fn operations(&self) -> Vec<crate::Op> {
        vec![crate::Op::monitor(
            "stats",
            "size_bytes, segments, oldest, written, dropped, blocks, write_errors",
        )]
    }

    fn invoke<'a>(&'a self, op: &'a str, _args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            match op {
                "stats" => Ok(self.state()),
                _ => Err(crate::OpErrors::new(&self.name, op).bad("unknown operation")),
            }
        })
    }
}

//! Prints what a FileStorage directory holds: the snapshot, each segment with its record
//! counts, index range and synced watermark, any recorded tail loss, and what `open` would
//! make of it — *damage* (synced bytes that no longer verify: refused) or a *torn tail*
//! (never-synced bytes: cut) — without changing anything. Exits non-zero on damage.
//!
//! ```text
//! cargo run --example inspect -- <dir>
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use raftkv::storage::file::inspect::inspect;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: inspect <storage directory>");
        return ExitCode::from(2);
    };
    match inspect(&dir) {
        Ok(report) => {
            print!("{report}");
            let entries: u64 = report.segments.iter().map(|s| s.entries).sum();
            let first = report
                .segments
                .iter()
                .filter_map(|s| s.index_range)
                .map(|r| r.0)
                .min();
            let last = report
                .segments
                .last()
                .and_then(|s| s.index_range)
                .map(|r| r.1);
            println!(
                "total: {} segment(s), {entries} entry record(s) spanning indexes {}..={} \
                 (records below the snapshot await compaction)",
                report.segments.len(),
                first.map_or("-".into(), |i| i.to_string()),
                last.map_or("-".into(), |i| i.to_string()),
            );
            let damaged = report
                .segments
                .iter()
                .filter(|s| s.damage.is_some())
                .count()
                + report
                    .snapshots
                    .iter()
                    .filter(|s| s.damage.is_some())
                    .count();
            let torn = report
                .segments
                .iter()
                .filter(|s| s.torn_tail.is_some())
                .count();
            if torn > 0 {
                println!("torn tail: {torn} segment(s) (never-synced bytes; open cuts them)");
            }
            if damaged > 0 {
                println!(
                    "damage: {damaged} file(s) (synced data: open refuses them; \
                     `node --recover` cuts a damaged log there)"
                );
                return ExitCode::FAILURE;
            }
            println!("damage: none");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inspect {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

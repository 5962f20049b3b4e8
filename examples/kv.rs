//! A command-line client for a cluster of `examples/node.rs` processes.
//!
//! ```sh
//! cargo run --example kv -- --nodes 1=127.0.0.1:8001,2=127.0.0.1:8002,3=127.0.0.1:8003 put k v
//! cargo run --example kv -- --nodes ... get k
//! cargo run --example kv -- --nodes ... status
//! ```
//!
//! Commands: `get KEY`, `put KEY VALUE`, `delete KEY`, `cas KEY EXPECTED|- NEW|-` (`-` means
//! absent), `scan START [END]`, `status`, `backup FILE`. Keys and values are taken as UTF-8
//! text. `backup FILE` writes a consistent backup of the cluster's state (every write
//! acknowledged before it) to FILE (mode 0600) and verifies it; `node --restore FILE`
//! starts a node of a new cluster from it.

#[allow(dead_code)]
#[path = "common/client_proto.rs"]
mod client_proto;

use std::process::ExitCode;
use std::time::Duration;

use client_proto::TcpKvEndpoint;
use raftkv::kv::{ClientOptions, KvClient};

const USAGE: &str = "usage: kv --nodes ID=HOST:PORT,... COMMAND

commands:
  get KEY
  put KEY VALUE
  delete KEY
  cas KEY EXPECTED|- NEW|-     (- means absent)
  scan START [END]             (at most 1000 entries)
  status                       (every node's role, term, leader, indexes and log size)
  backup FILE                  (a verified backup of the state; `node --restore FILE`)";

enum Command {
    Get(String),
    Put(String, String),
    Delete(String),
    Cas(String, Option<String>, Option<String>),
    Scan(String, Option<String>),
    Status,
    Backup(std::path::PathBuf),
}

fn parse_args(args: Vec<String>) -> Result<(TcpKvEndpoint, Command), String> {
    let mut rest = args.as_slice();
    let endpoint = match rest {
        [flag, list, tail @ ..] if flag == "--nodes" => {
            rest = tail;
            TcpKvEndpoint::new(client_proto::parse_addrs(list)?)
        }
        _ => return Err("--nodes is required (first)".into()),
    };
    let absent = |s: &String| (s != "-").then(|| s.clone());
    let command = match rest {
        [c, k] if c == "get" => Command::Get(k.clone()),
        [c, k, v] if c == "put" => Command::Put(k.clone(), v.clone()),
        [c, k] if c == "delete" => Command::Delete(k.clone()),
        [c, k, e, n] if c == "cas" => Command::Cas(k.clone(), absent(e), absent(n)),
        [c, s] if c == "scan" => Command::Scan(s.clone(), None),
        [c, s, e] if c == "scan" => Command::Scan(s.clone(), Some(e.clone())),
        [c] if c == "status" => Command::Status,
        [c, f] if c == "backup" => Command::Backup(f.into()),
        [] => return Err("no command given".into()),
        other => return Err(format!("cannot parse command `{}`", other.join(" "))),
    };
    Ok((endpoint, command))
}

fn main() -> ExitCode {
    let (endpoint, command) = match parse_args(std::env::args().skip(1).collect()) {
        Ok(parsed) => parsed,
        Err(why) => {
            eprintln!("kv: {why}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(endpoint, command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("kv: {why}");
            ExitCode::FAILURE
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn run(endpoint: TcpKvEndpoint, command: Command) -> Result<(), String> {
    if let Command::Status = command {
        print_status(&endpoint).await;
        return Ok(());
    }
    if let Command::Backup(file) = command {
        return backup(&endpoint, &file).await;
    }
    let mut client = KvClient::connect(endpoint, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let e = |e: raftkv::kv::ClientError| e.to_string();
    match command {
        Command::Get(k) => match client.get(k.into_bytes()).await.map_err(e)? {
            Some(v) => println!("{}", text(&v)),
            None => println!("(absent)"),
        },
        Command::Put(k, v) => {
            client
                .put(k.into_bytes(), v.into_bytes())
                .await
                .map_err(e)?;
            println!("ok");
        }
        Command::Delete(k) => {
            let existed = client.delete(k.into_bytes()).await.map_err(e)?;
            println!("{}", if existed { "deleted" } else { "(absent)" });
        }
        Command::Cas(k, expected, new) => {
            let swapped = client
                .cas(
                    k.into_bytes(),
                    expected.map(String::into_bytes),
                    new.map(String::into_bytes),
                )
                .await
                .map_err(e)?;
            println!("{}", if swapped { "swapped" } else { "not swapped" });
        }
        Command::Scan(start, end) => {
            let entries = client
                .scan(start.into_bytes(), end.map(String::into_bytes), 1000)
                .await
                .map_err(e)?;
            for (k, v) in &entries {
                println!("{} = {}", text(k), text(v));
            }
            println!("({} entries)", entries.len());
        }
        Command::Status | Command::Backup(_) => unreachable!("handled above"),
    }
    Ok(())
}

async fn print_status(endpoint: &TcpKvEndpoint) {
    use raftkv::kv::KvEndpoint;
    println!(
        "{:>4} {:<22} {:<13} {:>5} {:>6} {:>8} {:>8} {:>9} {:>10}",
        "node", "address", "role", "term", "leader", "commit", "applied", "snapshot", "log bytes"
    );
    for id in endpoint.nodes() {
        let Some(addr) = endpoint.addr(id) else {
            continue;
        };
        match client_proto::status(addr, Duration::from_secs(2)).await {
            Ok(s) => println!(
                "{:>4} {:<22} {:<13} {:>5} {:>6} {:>8} {:>8} {:>9} {:>10}",
                id,
                addr.to_string(),
                s.role,
                s.term,
                s.leader.map_or("-".to_string(), |l| l.to_string()),
                s.commit,
                s.applied,
                s.snapshot_index,
                s.log_bytes
            ),
            Err(e) => println!("{id:>4} {:<22} unreachable ({e})", addr.to_string()),
        }
    }
}

/// Takes a backup from the first node that gives one, into `file` (created 0600, removed
/// again if the backup fails), and verifies the file.
async fn backup(endpoint: &TcpKvEndpoint, file: &std::path::Path) -> Result<(), String> {
    use raftkv::kv::KvEndpoint;
    use std::os::unix::fs::OpenOptionsExt;
    let mut failures = Vec::new();
    for id in endpoint.nodes() {
        let Some(addr) = endpoint.addr(id) else {
            continue;
        };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(file)
            .map_err(|e| format!("cannot create {}: {e}", file.display()))?;
        match client_proto::backup(addr, &mut out, Duration::from_secs(30)).await {
            Ok(((index, term), bytes)) => {
                out.sync_all()
                    .map_err(|e| format!("cannot sync {}: {e}", file.display()))?;
                let reader = std::fs::File::open(file).map_err(|e| e.to_string())?;
                let info = raftkv::storage::backup::verify(std::io::BufReader::new(reader))
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                if (info.meta.index, info.meta.term) != (index, term) {
                    return Err(format!("{}: not the backup node {id} sent", file.display()));
                }
                println!(
                    "backup of node {id} at index {index} term {term}: {bytes} bytes in {}, verified",
                    file.display()
                );
                return Ok(());
            }
            Err(why) => failures.push(format!("node {id}: {why}")),
        }
    }
    let _ = std::fs::remove_file(file);
    Err(format!("no backup: {}", failures.join("; ")))
}

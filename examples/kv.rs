//! A command-line client for a cluster of `examples/node.rs` processes.
//!
//! ```sh
//! cargo run --example kv -- --nodes 1=127.0.0.1:8001,2=127.0.0.1:8002,3=127.0.0.1:8003 put k v
//! cargo run --example kv -- --nodes ... get k
//! cargo run --example kv -- --nodes ... status
//! ```
//!
//! Commands: `get KEY`, `put KEY VALUE`, `delete KEY`, `cas KEY EXPECTED|- NEW|-` (`-` means
//! absent), `scan START [END]`, `status`. Keys and values are taken as UTF-8 text.

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
  status                       (every node's role, term, leader, indexes and log size)";

enum Command {
    Get(String),
    Put(String, String),
    Delete(String),
    Cas(String, Option<String>, Option<String>),
    Scan(String, Option<String>),
    Status,
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
        Command::Status => unreachable!("handled above"),
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

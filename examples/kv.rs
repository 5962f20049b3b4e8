//! A command-line client for a cluster of `examples/node.rs` processes.
//!
//! ```sh
//! cargo run --example kv -- --nodes 1=127.0.0.1:8001,2=127.0.0.1:8002,3=127.0.0.1:8003 put k v
//! cargo run --example kv -- --nodes ... get k
//! cargo run --example kv -- --nodes ... status
//! cargo run --example kv -- --help
//! ```
//!
//! Writes open a session (exactly-once retries); reads and `status` do not. When a request
//! fails, the client says what it saw of each node: no quorum reachable, a refused secret, a
//! full disk, a value over the size limit — and gives up early when waiting cannot help.
//! `backup FILE` writes a consistent backup of the cluster's state (every write acknowledged
//! before it) to FILE (mode 0600) and verifies it; `node --restore FILE` starts a node of a
//! new cluster from it.
//!
//! Membership: `members` shows the configuration and every member's addresses;
//! `add-learner ID RAFT_ADDR CLIENT_ADDR` adds a node started with `node --join`,
//! `promote ID` makes a caught-up learner a voter, `remove ID` removes a member (not the
//! leader: `transfer ID` hands leadership to another voter first). The leader answers them;
//! the others redirect, as for writes.

#[allow(dead_code)]
#[path = "common/client_proto.rs"]
mod client_proto;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use client_proto::guard::Secret;
use client_proto::{ClientFailure, ClientRequest, Seen, TcpKvEndpoint};
use raftkv::error::ProposeError;
use raftkv::kv::{
    encode_query, Answer, ClientError, ClientOptions, KvClient, KvEndpoint, KvOp, KvResult,
};
use raftkv::NodeId;

const USAGE: &str = "usage: kv --nodes ID=HOST:PORT,... [options] COMMAND

commands:
  get KEY
  put KEY VALUE
  put KEY --file PATH          (the value is the file's bytes)
  delete KEY
  cas KEY EXPECTED|- NEW|-     (- means absent)
  scan START [END]             (at most 1000 entries)
  status                       (every node's role, term, leader, indexes, log size, disk)
  backup FILE                  (a verified backup of the state; `node --restore FILE`)
  members                      (the configuration: voters, learners, their addresses)
  add-learner ID RAFT CLIENT   (add node ID, started with `node --join`, as a learner; RAFT
                               and CLIENT are its HOST:PORT addresses)
  promote ID                   (make learner ID a voter once it has caught up; retried
                               until it has or --timeout)
  remove ID                    (remove voter or learner ID; not the leader: transfer first)
  transfer ID                  (hand leadership to voter ID)
  help

options:
  --nodes LIST          the nodes' client addresses (or set RAFTKV_NODES)
  --secret-file F       the client secret the nodes were started with (--client-secret-file)
  --timeout SECS        give up after this long (default 10)
  -h, --help            this help

Writes open a session; reads, status and membership requests do not. --nodes need not list
members added later: the client learns them from the leader. Exit status: 0 done, 1 failed,
2 bad usage.";

enum Command {
    Get(String),
    Put(String, Vec<u8>),
    Delete(String),
    Cas(String, Option<String>, Option<String>),
    Scan(String, Option<String>),
    Status,
    Backup(std::path::PathBuf),
    /// A member request (`members`, `add-learner`, `promote`, `remove`, `transfer`).
    Member(client_proto::ClientRequest),
}

struct Cli {
    endpoint: TcpKvEndpoint,
    deadline: Duration,
    command: Command,
}

enum Usage {
    Help,
    Bad(String),
}

impl From<String> for Usage {
    fn from(s: String) -> Self {
        Usage::Bad(s)
    }
}

fn parse_id(word: &str) -> Result<NodeId, String> {
    match word.parse::<NodeId>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!("`{word}` is not a node id (1 or more)")),
    }
}

fn parse_command(words: &[String]) -> Result<Command, String> {
    let absent = |s: &String| (s != "-").then(|| s.clone());
    Ok(match words {
        [c, k] if c == "get" => Command::Get(k.clone()),
        [c, k, f, path] if c == "put" && f == "--file" => {
            let value = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            Command::Put(k.clone(), value)
        }
        [c, k, v] if c == "put" => Command::Put(k.clone(), v.clone().into_bytes()),
        [c, k] if c == "delete" => Command::Delete(k.clone()),
        [c, k, e, n] if c == "cas" => Command::Cas(k.clone(), absent(e), absent(n)),
        [c, s] if c == "scan" => Command::Scan(s.clone(), None),
        [c, s, e] if c == "scan" => Command::Scan(s.clone(), Some(e.clone())),
        [c] if c == "status" => Command::Status,
        [c, f] if c == "backup" => Command::Backup(f.into()),
        [c] if c == "members" => Command::Member(ClientRequest::Members),
        [c, id, raft, client] if c == "add-learner" => Command::Member(ClientRequest::AddLearner {
            id: parse_id(id)?,
            raft: raft
                .parse()
                .map_err(|_| format!("add-learner: `{raft}` is not a HOST:PORT Raft address"))?,
            client: client.parse().map_err(|_| {
                format!("add-learner: `{client}` is not a HOST:PORT client address")
            })?,
        }),
        [c, id] if c == "promote" => Command::Member(ClientRequest::Promote(parse_id(id)?)),
        [c, id] if c == "remove" => Command::Member(ClientRequest::Remove(parse_id(id)?)),
        [c, id] if c == "transfer" => {
            Command::Member(ClientRequest::TransferLeadership(parse_id(id)?))
        }
        [] => return Err("no command given".into()),
        other => return Err(format!("cannot parse command `{}`", other.join(" "))),
    })
}

fn parse_args(args: Vec<String>) -> Result<Cli, Usage> {
    let mut nodes = std::env::var("RAFTKV_NODES").ok();
    let mut secret_file: Option<PathBuf> = None;
    let mut deadline = Duration::from_secs(10);
    let mut rest = args.as_slice();
    // Options first (in any order), then the command and its words.
    while let [flag, tail @ ..] = rest {
        let value = || {
            tail.first()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Err(Usage::Help),
            "--nodes" => nodes = Some(value()?),
            "--secret-file" => secret_file = Some(PathBuf::from(value()?)),
            "--timeout" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("--timeout: `{v}` is not a number of seconds"))?;
                deadline = Duration::from_secs_f64(secs);
            }
            _ => break,
        }
        rest = &tail[1..];
    }
    if rest.first().is_some_and(|c| c == "help") {
        return Err(Usage::Help);
    }
    let nodes = nodes.ok_or_else(|| "--nodes is required (or set RAFTKV_NODES)".to_string())?;
    let mut endpoint = TcpKvEndpoint::new(client_proto::parse_addrs(&nodes)?);
    if let Some(path) = secret_file {
        let (secret, warning) = Secret::from_file(&path)?;
        if let Some(w) = warning {
            eprintln!("kv: warning: {w}");
        }
        endpoint = endpoint.with_secret(secret);
    }
    Ok(Cli {
        endpoint,
        deadline,
        command: parse_command(rest)?,
    })
}

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args().skip(1).collect()) {
        Ok(parsed) => parsed,
        Err(Usage::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(Usage::Bad(why)) => {
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
    match runtime.block_on(run(cli)) {
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

/// After this long without a leader, a cluster of which fewer than a majority answer is
/// reported as such (several election timeouts: one cannot be elected meanwhile).
const NO_QUORUM_AFTER: Duration = Duration::from_millis(2500);

/// What the endpoint saw of the nodes since `since`, when it settles the request's fate:
/// `Some(explanation)` if waiting longer cannot help.
fn settled(
    seen: &BTreeMap<NodeId, (Instant, Seen)>,
    nodes: usize,
    since: Instant,
) -> Option<String> {
    let fresh: Vec<(NodeId, &Seen)> = seen
        .iter()
        .filter(|(_, (at, _))| *at >= since)
        .map(|(id, (_, s))| (*id, s))
        .collect();
    for (id, s) in &fresh {
        match s {
            Seen::Answered(Err(ClientFailure::TooLarge { size, max })) => {
                return Some(format!(
                    "too large: the command takes {size} bytes, and the cluster's largest entry \
                     is {max} bytes; nothing was written"
                ))
            }
            Seen::Answered(Err(ClientFailure::NoSpace)) => {
                return Some(format!(
                    "node {id} (the leader) is out of disk space: the write was refused and not \
                     applied (see `kv status`)"
                ))
            }
            _ => {}
        }
    }
    if fresh.len() < nodes {
        return None; // not every node tried yet
    }
    if fresh.iter().all(|(_, s)| matches!(s, Seen::Refused(_))) {
        let hint = if fresh
            .iter()
            .any(|(_, s)| matches!(s, Seen::Refused(why) if why.contains("secret")))
        {
            " — the client secret is wrong or missing: give --secret-file the file the nodes \
             were started with (--client-secret-file)"
        } else {
            ""
        };
        return Some(format!(
            "every node refused the connection{hint}; {}",
            describe(&fresh)
        ));
    }
    let answering = fresh
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Answered(_) | Seen::NoAnswer(_)))
        .count();
    let majority = nodes / 2 + 1;
    if answering < majority && since.elapsed() >= NO_QUORUM_AFTER {
        return Some(format!(
            "no quorum reachable: {answering} of {nodes} nodes answer and {majority} are needed \
             to elect a leader and commit; {}",
            describe(&fresh)
        ));
    }
    None
}

/// One clause per node: what it last did.
fn describe(seen: &[(NodeId, &Seen)]) -> String {
    seen.iter()
        .map(|(id, s)| {
            let what = match s {
                Seen::Unreachable(why) => format!("unreachable ({why})"),
                Seen::Refused(why) => format!("refused us ({why})"),
                Seen::Answered(Ok(())) => "answered".to_string(),
                Seen::Answered(Err(ClientFailure::NotLeader(None))) => {
                    "up, knows no leader".to_string()
                }
                Seen::Answered(Err(ClientFailure::NotLeader(Some(l)))) => {
                    format!("up, says node {l} leads")
                }
                // A leader that lost its quorum keeps the proposal until it times out.
                Seen::Answered(Err(ClientFailure::Timeout | ClientFailure::Dropped)) => {
                    "up, but what it proposed did not commit".to_string()
                }
                Seen::Answered(Err(f)) => format!("refused: {f}"),
                Seen::NoAnswer(why) => format!("no answer ({why})"),
            };
            format!("node {id} {what}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs `op` until it finishes, or until what the endpoint saw settles its fate; the error
/// says what is true.
async fn explained<T>(
    endpoint: &TcpKvEndpoint,
    op: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let since = Instant::now();
    let nodes = endpoint.nodes().len();
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(why) = settled(&endpoint.seen(), nodes, since) {
                return why;
            }
        }
    };
    tokio::select! {
        done = op => done.map_err(|e| {
            // The deadline passed (or another failure): add what each node last did.
            let seen = endpoint.seen();
            let fresh: Vec<(NodeId, &Seen)> =
                seen.iter().filter(|(_, (at, _))| *at >= since).map(|(id, (_, s))| (*id, s)).collect();
            if fresh.is_empty() {
                e
            } else {
                format!("{e}\n  what each node last did: {}", describe(&fresh))
            }
        }),
        why = watch => Err(why),
    }
}

fn client_error(e: ClientError) -> String {
    match e {
        ClientError::TooLarge { size, max } => format!(
            "too large: the command takes {size} bytes, and the cluster's largest entry is {max} \
             bytes; nothing was written"
        ),
        ClientError::Timeout {
            attempts, cause, ..
        } => format!(
            "outcome unknown after {attempts} attempts ({cause}): the write may have been \
             applied (never twice)"
        ),
        other => other.to_string(),
    }
}

/// A linearizable read without a session (no log write): asks the leader, following
/// redirects, until `deadline`.
async fn read(endpoint: &TcpKvEndpoint, op: KvOp, deadline: Duration) -> Result<KvResult, String> {
    let query = encode_query(&op);
    let nodes = endpoint.nodes();
    let until = Instant::now() + deadline;
    let mut next: Option<NodeId> = None;
    let mut cursor = 0;
    let mut backoff = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let node = next.take().unwrap_or_else(|| {
            cursor = (cursor + 1) % nodes.len().max(1);
            nodes.get(cursor).copied().unwrap_or(0)
        });
        let last = match endpoint.read(node, query.clone()).await {
            Ok(KvResult::Error(e)) => return Err(format!("refused: {e}")),
            Ok(result) => return Ok(result),
            Err(ProposeError::NotLeader { leader: Some(l) }) if l != node => {
                next = Some(l);
                continue;
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() + backoff > until {
            return Err(format!(
                "gave up after {attempts} attempts; the last error was: {last}"
            ));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let Cli {
        endpoint,
        deadline,
        command,
    } = cli;
    let options = ClientOptions {
        deadline,
        ..ClientOptions::default()
    };
    let session = || async {
        KvClient::connect(endpoint.clone(), options)
            .await
            .map_err(|e| format!("cannot open a session: {}", client_error(e)))
    };
    match command {
        Command::Status => {
            // Members added since --nodes was written are shown too.
            let _ = endpoint
                .member_request(&ClientRequest::Members, Duration::from_secs(2))
                .await;
            print_status(&endpoint).await
        }
        Command::Member(request) => member(&endpoint, &request, deadline).await?,
        Command::Backup(file) => backup(&endpoint, &file).await?,
        Command::Get(k) => {
            let answer = explained(
                &endpoint,
                read(
                    &endpoint,
                    KvOp::Get {
                        key: k.into_bytes(),
                    },
                    deadline,
                ),
            )
            .await?;
            match answer {
                KvResult::Ok {
                    answer: Answer::Value(Some(v)),
                    ..
                } => println!("{}", text(&v)),
                KvResult::Ok {
                    answer: Answer::Value(None),
                    ..
                } => println!("(absent)"),
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
        Command::Scan(start, end) => {
            let op = KvOp::Scan {
                start: start.into_bytes(),
                end: end.map(String::into_bytes),
                limit: 1000,
            };
            match explained(&endpoint, read(&endpoint, op, deadline)).await? {
                KvResult::Ok {
                    answer: Answer::Entries(entries),
                    ..
                } => {
                    for (k, v) in &entries {
                        println!("{} = {}", text(k), text(v));
                    }
                    println!("({} entries)", entries.len());
                }
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
        Command::Put(k, v) => {
            explained(&endpoint, async {
                let mut client = session().await?;
                client.put(k.into_bytes(), v).await.map_err(client_error)
            })
            .await?;
            println!("ok");
        }
        Command::Delete(k) => {
            let existed = explained(&endpoint, async {
                let mut client = session().await?;
                client.delete(k.into_bytes()).await.map_err(client_error)
            })
            .await?;
            println!("{}", if existed { "deleted" } else { "(absent)" });
        }
        Command::Cas(k, expected, new) => {
            let swapped = explained(&endpoint, async {
                let mut client = session().await?;
                client
                    .cas(
                        k.into_bytes(),
                        expected.map(String::into_bytes),
                        new.map(String::into_bytes),
                    )
                    .await
                    .map_err(client_error)
            })
            .await?;
            println!("{}", if swapped { "swapped" } else { "not swapped" });
        }
    }
    Ok(())
}

async fn print_status(endpoint: &TcpKvEndpoint) {
    println!(
        "{:>4} {:<22} {:<13} {:>5} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10}  health",
        "node",
        "address",
        "role",
        "term",
        "leader",
        "commit",
        "applied",
        "last",
        "snapshot",
        "log bytes"
    );
    let mut notes = Vec::new();
    for id in endpoint.nodes() {
        let Some(addr) = endpoint.addr(id) else {
            continue;
        };
        match client_proto::status_with(addr, &endpoint.secret, Duration::from_secs(2)).await {
            Ok(s) => {
                let health = match (&s.fatal_error, &s.disk_full) {
                    (Some(_), _) => "FATAL",
                    (None, Some(_)) => "DISK FULL",
                    (None, None) => "ok",
                };
                println!(
                    "{:>4} {:<22} {:<13} {:>5} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10}  {health}",
                    id,
                    addr.to_string(),
                    s.role,
                    s.term,
                    s.leader.map_or("-".to_string(), |l| l.to_string()),
                    s.commit,
                    s.applied,
                    s.last_index,
                    s.snapshot_index,
                    s.log_bytes,
                );
                let m = &s.metrics;
                notes.push(format!(
                    "node {id}: {} proposals ({} refused), {} committed, {} applied, {} reads; \
                     {} fsyncs (p50 <= {} us, p99 <= {} us, max {} us), up to {} entries a batch; \
                     {} leader changes; snapshots {} taken, {} installed; inbox {}",
                    m.proposals,
                    m.proposals_refused,
                    m.committed,
                    m.applied,
                    m.reads_served,
                    m.fsyncs,
                    m.fsync_p50_us,
                    m.fsync_p99_us,
                    m.fsync_max_us,
                    m.max_batch_entries,
                    m.leader_changes,
                    m.snapshots_taken,
                    m.snapshots_installed,
                    m.inbox_depth
                ));
                if let Some(after) = s.recovering_after {
                    notes.push(format!(
                        "node {id}: recovering: its log after index {after} was lost; it does not \
                         vote until a leader has brought it back"
                    ));
                }
                if let Some(f) = &s.fatal_error {
                    notes.push(format!("node {id}: fatal_error: {f}"));
                }
                if let Some(d) = &s.disk_full {
                    notes.push(format!("node {id}: disk_full: {d}"));
                }
            }
            Err(e) => println!("{id:>4} {:<22} unreachable ({e})", addr.to_string()),
        }
    }
    for n in notes {
        println!("{n}");
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
        match client_proto::backup(addr, &endpoint.secret, &mut out, Duration::from_secs(30)).await
        {
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

/// Sends a member request to the leader and prints the configuration it answers.
async fn member(
    endpoint: &TcpKvEndpoint,
    request: &ClientRequest,
    deadline: Duration,
) -> Result<(), String> {
    let what = match request {
        ClientRequest::Members => "members".to_string(),
        ClientRequest::AddLearner { id, .. } => format!("add-learner {id}"),
        ClientRequest::Promote(id) => format!("promote {id}"),
        ClientRequest::Remove(id) => format!("remove {id}"),
        ClientRequest::TransferLeadership(id) => format!("transfer {id}"),
        other => format!("{other:?}"),
    };
    let view = endpoint
        .member_request(request, deadline)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let list = |ids: &[NodeId]| {
        if ids.is_empty() {
            "-".to_string()
        } else {
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
        }
    };
    println!("leader: {}", view.leader);
    println!("voters: {}", list(&view.voters));
    if !view.outgoing.is_empty() {
        println!("outgoing voters (joint): {}", list(&view.outgoing));
    }
    println!("learners: {}", list(&view.learners));
    println!("{:>4} {:<8} {:<22} client", "node", "role", "raft");
    for id in view.members() {
        let role = if view.voters.contains(&id) || view.outgoing.contains(&id) {
            "voter"
        } else {
            "learner"
        };
        let (raft, client) = match view.addrs.get(&id) {
            Some(a) => (
                a.raft.to_string(),
                a.client.map_or("-".to_string(), |c| c.to_string()),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        println!("{id:>4} {role:<8} {raft:<22} {client}");
    }
    Ok(())
}

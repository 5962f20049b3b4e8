//! The one-command TCP demo: three `node` processes on loopback, a client writing through
//! them, one node killed with SIGKILL and restarted from its data directory, every node
//! killed at once and restarted, then a follower's data directory deleted under load (a lost
//! disk) and the node started again with the same command, and proof after each step that
//! nothing acknowledged was lost.
//!
//! Run with: `cargo run --release --example cluster` (it builds the `node` example first if
//! it is missing).

#[allow(dead_code)]
#[path = "common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "common/processes.rs"]
mod processes;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use processes::ProcessCluster;
use raftkv::kv::KvClient;
use raftkv::NodeId;

use client_proto::TcpKvEndpoint;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cluster: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("\ncluster: FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The `node` binary next to this one, built first: always when run by cargo (`cargo run`
/// sets `CARGO`; the build is a no-op when the binary is up to date, and a stale one would
/// run old code), else only if it is missing.
fn node_binary() -> Result<std::path::PathBuf, String> {
    let path = processes::node_binary_path()?;
    if path.exists() && std::env::var_os("CARGO").is_none() {
        return Ok(path);
    }
    let examples = path.parent().ok_or("no examples directory")?;
    let release = examples
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "release");
    println!(
        "== Building the node binary (`cargo build{} --example node`)",
        if release { " --release" } else { "" }
    );
    processes::build_examples(examples, release, true).map_err(|e| {
        format!("{e}\nbuild the examples with `cargo build --release --examples` and try again")
    })?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} still missing; build it with `cargo build --release --examples`",
            path.display()
        ))
    }
}

async fn print_statuses(cluster: &ProcessCluster) {
    println!(
        "    {:>4} {:<10} {:>5} {:>6} {:>7} {:>8} {:>9} {:>10}",
        "node", "role", "term", "leader", "commit", "applied", "snapshot", "log bytes"
    );
    for (id, status) in cluster.statuses().await {
        match status {
            Some(s) => println!(
                "    {:>4} {:<10} {:>5} {:>6} {:>7} {:>8} {:>9} {:>10}",
                id,
                s.role,
                s.term,
                s.leader.map_or("-".into(), |l| l.to_string()),
                s.commit,
                s.applied,
                s.snapshot_index,
                s.log_bytes
            ),
            None => println!("    {id:>4} (down)"),
        }
    }
}

async fn put_range(
    client: &mut KvClient<TcpKvEndpoint>,
    range: std::ops::Range<u32>,
) -> Result<(), String> {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let every = if range.len() > 200 { 250 } else { 25 };
    for i in range.clone() {
        let put_started = Instant::now();
        client
            .put(
                format!("key-{i:04}").into_bytes(),
                format!("value-{i}").into_bytes(),
            )
            .await
            .map_err(|e| format!("put key-{i:04}: {e}"))?;
        slowest = slowest.max(put_started.elapsed());
        if (i + 1) % every == 0 {
            println!("    ... {} keys written", i + 1);
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "    {} puts in {ms:.0} ms (each acknowledged once fsynced by a majority); slowest {:.1} ms",
        range.len(),
        slowest.as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn verify(client: &mut KvClient<TcpKvEndpoint>, count: u32) -> Result<(), String> {
    for i in 0..count {
        let key = format!("key-{i:04}");
        let got = client
            .get(key.clone().into_bytes())
            .await
            .map_err(|e| format!("get {key}: {e}"))?;
        let want = format!("value-{i}").into_bytes();
        if got.as_deref() != Some(want.as_slice()) {
            return Err(format!("{key} is {got:?}, expected value-{i}"));
        }
    }
    let all = client
        .scan(b"key-".to_vec(), None, 10_000)
        .await
        .map_err(|e| format!("scan: {e}"))?;
    if all.len() != count as usize {
        return Err(format!("scan found {} keys, expected {count}", all.len()));
    }
    println!("    all {count} keys read back (get each, then one scan), every value intact");
    Ok(())
}

async fn run() -> Result<(), String> {
    let binary = node_binary()?;
    println!("== Starting 3 node processes ({})", binary.display());
    let mut cluster = ProcessCluster::start(binary, 3)?;
    println!("    data and logs in {}", cluster.dir().display());
    let leader = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    println!("    node {leader} was elected leader");
    print_statuses(&cluster).await;

    let options = processes::client_options();
    let mut client = KvClient::connect(cluster.endpoint(), options)
        .await
        .map_err(|e| format!("cannot open a session: {e}"))?;
    println!("\n== Writing 100 keys through KvClient over TCP");
    put_range(&mut client, 0..100).await?;
    println!(
        "    (session {}, opened by the first write)",
        client.session()
    );

    let victim: NodeId = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    println!("\n== Killing node {victim} (the leader) with SIGKILL");
    cluster.kill(victim);
    let killed_at = Instant::now();
    println!("== Writing 100 more keys while it is down (the client follows the new leader)");
    put_range(&mut client, 100..200).await?;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    println!(
        "    node {new_leader} leads now ({:.1} s after the kill)",
        killed_at.elapsed().as_secs_f64()
    );
    print_statuses(&cluster).await;

    println!("\n== Restarting node {victim} from its data directory");
    cluster.restart(victim)?;
    let commit = cluster
        .status(new_leader)
        .await
        .map(|s| s.commit)
        .ok_or("the leader stopped answering")?;
    let restarted = Instant::now();
    let caught_up = cluster
        .wait_applied(victim, commit, Duration::from_secs(30))
        .await?;
    println!(
        "    node {victim} caught up to index {} in {:.1} s (leader's commit was {commit})",
        caught_up.applied,
        restarted.elapsed().as_secs_f64()
    );
    print_statuses(&cluster).await;

    println!("\n== Reading everything back");
    verify(&mut client, 200).await?;

    println!("\n== Killing every node at once, then restarting them all");
    cluster.kill_all();
    for id in cluster.ids() {
        cluster.restart(id)?;
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    println!("    node {leader} was elected leader after the full restart");
    verify(&mut client, 200).await?;
    print_statuses(&cluster).await;

    let lost = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .ok_or("no follower")?;
    println!(
        "\n== A lost disk under load: node {lost}'s data directory deleted while a second client writes 1,000 keys"
    );
    let mut writer = KvClient::connect(cluster.endpoint(), options)
        .await
        .map_err(|e| format!("cannot open a second session: {e}"))?;
    let writes = tokio::spawn(async move { put_range(&mut writer, 200..1200).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(lost);
    let data = cluster.data_dir(lost).ok_or("no data directory")?;
    std::fs::remove_dir_all(&data).map_err(|e| format!("removing {}: {e}", data.display()))?;
    println!(
        "    removed {}; restarting node {lost} with the same command",
        data.display()
    );
    let log_before = cluster.log(lost).len();
    cluster.restart(lost)?;
    writes.await.map_err(|e| format!("writer: {e}"))??;
    let commit = cluster
        .status(leader)
        .await
        .map(|s| s.commit)
        .ok_or("the leader stopped answering")?;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(30);
    loop {
        let s = cluster
            .wait_applied(lost, commit, Duration::from_secs(30))
            .await?;
        if s.recovering_after.is_none() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("node {lost} is still recovering: {s:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !cluster.log(lost)[log_before..].contains("recovering from a lost log tail") {
        return Err(format!("node {lost} did not start as a lost disk"));
    }
    println!(
        "    node {lost} started as a lost disk (it asked every peer, voted and acknowledged nothing \
         until the leader had caught it up) and is back at index {commit}+"
    );
    println!("== Killing node {leader} (the leader): node {lost} and the third node must carry on");
    cluster.kill(leader);
    let next = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    println!("    node {next} leads");
    verify(&mut client, 1200).await?;
    print_statuses(&cluster).await;

    println!(
        "\n== Stopping the nodes and removing {}",
        cluster.dir().display()
    );
    drop(cluster);
    println!("done.");
    Ok(())
}

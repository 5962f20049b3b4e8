//! What an operator of the demo cluster sees and does, against real `examples/node.rs`
//! processes and the `examples/kv.rs` CLI on 127.0.0.1:
//!
//! - shared secrets on both ports: the right ones work; a wrong or missing client secret is
//!   refused at once with a message that says so; a node with a wrong peer secret cannot join
//!   (and both sides log why);
//! - `kv --help` prints help (the membership commands too); `node` refuses a `--client`
//!   address that is its Raft address, and a `--join` whose `--peers` names no member;
//! - with 1 of 3 nodes up, a put says no quorum is reachable, within seconds;
//! - `kv status` shows `last`, and health (`disk_full`, `fatal_error`);
//! - a restarted node's start line says what it recovered; `RUST_LOG` sets the level.
//!
//! One test at a time (a lock), each bounded; every process is killed when its test ends.

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use client_proto::guard::Secret;
use processes::{run_bounded as run, ProcessCluster};
use raftkv::kv::{ClientOptions, KvClient};
use tokio::time::sleep;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| processes::build_node_for_tests(false).expect("building the examples"))
        .clone()
}

/// Runs `kv` with `args`: (exit success, stdout, stderr, how long it took).
fn kv(args: &[&str]) -> processes::CliRun {
    processes::run_cli(&processes::kv_binary_beside(&binary()), args)
}

fn nodes_arg(cluster: &ProcessCluster) -> String {
    cluster
        .ids()
        .iter()
        .map(|&id| format!("{id}={}", cluster.client_addr(id).expect("addr")))
        .collect::<Vec<_>>()
        .join(",")
}

fn write_secret(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    path.display().to_string()
}

#[test]
fn secrets_on_both_ports_let_the_right_ones_in_and_refuse_the_rest() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let mut cluster = ProcessCluster::new(binary(), 3).expect("cluster");
        let dir = cluster.dir().to_path_buf();
        let peer = write_secret(&dir, "peer.secret", "peers-only secret 0123456789\n");
        let wrong_peer = write_secret(&dir, "wrong-peer.secret", "not the peers' secret 98765\n");
        let client = write_secret(&dir, "client.secret", "clients' secret abcdefghijkl\n");
        let wrong_client = write_secret(&dir, "wrong.secret", "a guess at the secret 000000\n");
        for id in 1..=3 {
            // Node 3 has the wrong peer secret: it must not join.
            let peer_file = if id == 3 { &wrong_peer } else { &peer };
            // A new cluster that must form without one member: nodes 1 and 2 may not wait
            // for node 3's answer, so they are told their empty directories are new.
            cluster.set_extra_args(
                id,
                vec![
                    "--peer-secret-file".into(),
                    peer_file.clone(),
                    "--client-secret-file".into(),
                    client.clone(),
                    "--new-cluster".into(),
                ],
            );
            cluster.restart(id).expect("start");
        }
        cluster.set_client_secret(Secret::new(b"clients' secret abcdefghijkl".to_vec()));
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .expect("nodes 1 and 2 elect a leader");

        // The right client secret works, through the CLI and through KvClient.
        let nodes = nodes_arg(&cluster);
        let (ok, out, err, _) = kv(&["--nodes", &nodes, "--secret-file", &client, "put", "k", "v"]);
        assert!(ok, "put with the right secret: {out}{err}");
        let (ok, out, _, _) = kv(&["--nodes", &nodes, "--secret-file", &client, "get", "k"]);
        assert!(ok && out.trim() == "v", "get: {out}");
        let mut c = KvClient::connect(cluster.endpoint(), ClientOptions::default())
            .await
            .expect("session with the right secret");
        c.put("k2", "v2").await.expect("put");

        // A wrong client secret, and none: refused at once, and the message says why.
        for args in [
            vec![
                "--nodes",
                &nodes,
                "--secret-file",
                &wrong_client,
                "put",
                "k",
                "x",
            ],
            vec!["--nodes", &nodes, "put", "k", "x"],
        ] {
            let (ok, out, err, took) = kv(&args);
            eprintln!("auth: kv {:?}: {took:.1?}: {}", &args[2..], err.trim());
            assert!(!ok, "a put without the secret succeeded: {out}");
            assert!(err.contains("secret"), "{err}");
            assert!(took < Duration::from_secs(5), "refused only after {took:?}");
        }
        let (_, out, _, _) = kv(&["--nodes", &nodes, "--secret-file", &client, "get", "k"]);
        assert_eq!(out.trim(), "v", "a refused client changed the value");

        // Node 3, with the wrong peer secret, never catches up; both sides log the refusal.
        let leader = cluster
            .wait_for_leader(Duration::from_secs(5))
            .await
            .expect("leader");
        assert_ne!(leader, 3);
        sleep(Duration::from_secs(1)).await;
        let three = cluster.status(3).await.expect("node 3 answers its clients");
        assert_eq!(
            three.applied, 0,
            "node 3 applied entries without the secret"
        );
        let refused_by_peers = [1, 2].iter().any(|&id| {
            cluster
                .log(id)
                .lines()
                .any(|l| l.contains("refused peer") && l.contains("secret"))
        });
        assert!(refused_by_peers, "no refusal logged:\n{}", cluster.log(1));
        assert!(
            cluster.log(3).contains("secret is wrong or missing"),
            "node 3 does not say why:\n{}",
            cluster.log(3)
        );
    });
}

#[test]
fn the_cli_helps_and_the_node_refuses_a_client_port_on_its_raft_port() {
    let _serial = serial();
    let (ok, out, _, _) = kv(&["--help"]);
    assert!(
        ok && out.contains("usage: kv") && out.contains("status"),
        "{out}"
    );
    for command in [
        "members",
        "add-learner ID RAFT CLIENT",
        "promote ID",
        "remove ID",
        "transfer ID",
    ] {
        assert!(
            out.contains(command),
            "kv --help does not list `{command}`: {out}"
        );
    }
    let (ok, out, _, _) = kv(&["help"]);
    assert!(ok && out.contains("usage: kv"), "{out}");
    let (ok, _, err, _) = kv(&["--nodes", "1=127.0.0.1:1", "promote", "zero"]);
    assert!(!ok && err.contains("`zero` is not a node id"), "{err}");
    let (ok, _, err, _) = kv(&["--nodes", "1=127.0.0.1:1", "add-learner", "4", "x", "y"]);
    assert!(!ok && err.contains("not a HOST:PORT Raft address"), "{err}");
    let (ok, _, err, _) = kv(&["get"]);
    assert!(!ok && err.contains("--nodes is required"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(binary())
        .args([
            "--id",
            "1",
            "--peers",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
            "--client",
            "127.0.0.1:7001",
            "--data",
        ])
        .arg(dir.path())
        .output()
        .expect("node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is this node's Raft address"),
        "node said: {err}"
    );
    let help = Command::new(binary()).arg("--help").output().expect("node");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--cluster-id") && help.contains("--join"),
        "{help}"
    );
    let out = Command::new(binary())
        .args(["--id", "4", "--join", "--peers", "4=127.0.0.1:7004"])
        .args(["--client", "127.0.0.1:8004", "--data"])
        .arg(dir.path())
        .output()
        .expect("node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--join needs --peers to name at least one member"),
        "node said: {err}"
    );
}

#[test]
fn with_one_node_of_three_up_a_put_says_no_quorum_is_reachable() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let mut cluster = ProcessCluster::start(binary(), 3).expect("cluster");
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .expect("leader");
        let nodes = nodes_arg(&cluster);
        let (ok, _, err, _) = kv(&["--nodes", &nodes, "put", "a", "1"]);
        assert!(ok, "{err}");

        // `kv status` shows the last index and health columns.
        let (ok, out, _, _) = kv(&["--nodes", &nodes, "status"]);
        assert!(ok, "{out}");
        let header = out.lines().next().unwrap_or_default();
        assert!(
            header.contains("last") && header.contains("health"),
            "{out}"
        );
        assert_eq!(
            out.lines().filter(|l| l.ends_with(" ok")).count(),
            3,
            "{out}"
        );

        cluster.kill(1);
        cluster.kill(2);
        let (ok, _, err, took) = kv(&["--nodes", &nodes, "put", "a", "2"]);
        eprintln!(
            "no quorum: kv put with 1 of 3 nodes up: {took:.1?}: {}",
            err.trim()
        );
        assert!(!ok);
        assert!(err.contains("no quorum reachable"), "{err}");
        assert!(err.contains("node 3 up"), "{err}");
        assert!(took < Duration::from_secs(9), "took {took:?}");
        let (_, out, _, _) = kv(&["--nodes", &nodes, "status"]);
        assert!(out.contains("unreachable"), "{out}");

        // Restarted, a node says what it recovered.
        cluster.restart(1).expect("restart");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster.log(1).contains("recovered term") && Instant::now() < deadline {
            sleep(Duration::from_millis(100)).await;
        }
        let log = cluster.log(1);
        let line = log
            .lines()
            .find(|l| l.contains("recovered term"))
            .unwrap_or_else(|| panic!("no recovery line:\n{log}"));
        eprintln!("start line: {line}");
        assert!(line.contains("last log index") && line.contains("snapshot index"));
        assert!(line.contains(" INFO "), "not a tracing line: {line}");
    });
}

#[test]
fn rust_log_sets_the_node_s_level() {
    let _serial = serial();
    run(Duration::from_secs(60), async {
        let mut cluster = ProcessCluster::new(binary(), 1).expect("cluster");
        // One node at warn: its start line (info) is not printed...
        cluster.set_env(1, vec![("RUST_LOG".into(), "warn".into())]);
        cluster.restart(1).expect("start");
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .expect("a single node leads");
        assert!(!cluster.log(1).contains(" INFO "), "{}", cluster.log(1));
        // ...and at info it is.
        cluster.kill(1);
        cluster.set_env(1, vec![("RUST_LOG".into(), "info".into())]);
        cluster.restart(1).expect("restart");
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .expect("leads again");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cluster.log(1).contains(" INFO ") && Instant::now() < deadline {
            sleep(Duration::from_millis(100)).await;
        }
        assert!(cluster.log(1).contains(" INFO "), "{}", cluster.log(1));
    });
}

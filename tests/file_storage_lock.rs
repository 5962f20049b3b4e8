//! One process per data directory: a second `FileStorage::open` of a directory in use — from
//! another process or from this one — fails at once with `StorageError::InUse` naming the
//! holder's pid, and the lock dies with its process (SIGKILL included), so there is never a
//! stale lock. Files are created 0600 and directories 0700.
//!
//! The other process is this test binary run again with `RAFTKV_LOCK_CHILD` set: it opens the
//! directory, says what happened on stdout, and (when it got the lock) holds it until killed
//! or until its stdin closes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, SnapshotMeta};
use raftkv::storage::{FileStorage, FileStorageOptions, Storage};

const CHILD_ENV: &str = "RAFTKV_LOCK_CHILD";
/// Starts the child's answer on its stdout (the test harness may print before it on the
/// same line).
const MARK: &str = "@@lock-child@@ ";

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 9,
        node_id: 1,
        segment_size: 64 << 10,
        ..Default::default()
    }
}

/// Child mode: open the directory named by the environment, report, hold.
fn child(dir: &str) {
    match FileStorage::open(dir, opts()) {
        Ok(mut s) => {
            s.set_hard_state(HardState {
                term: 1,
                vote: Some(1),
            })
            .unwrap();
            s.sync().unwrap();
            println!("{MARK}LOCKED {}", std::process::id());
            std::io::stdout().flush().unwrap();
            // Hold the lock until the parent closes our stdin (or kills us).
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        Err(StorageError::InUse { pid, .. }) => {
            println!("{MARK}IN_USE {}", pid.map_or("?".into(), |p| p.to_string()));
        }
        Err(other) => println!("{MARK}ERROR {other}"),
    }
}

/// Starts this test again as a child on `dir`; returns it (the caller waits for it) and its
/// answer.
#[allow(clippy::zombie_processes)] // returned to the caller, which kills or waits for it
fn spawn_child(dir: &Path, test: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(out.read_line(&mut line), Ok(n) if n > 0) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child ended without answering");
        }
        if let Some(at) = line.find(MARK) {
            // Keep reading what the child's harness prints after it, so it never hits a
            // closed pipe.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return (child, line[at + MARK.len()..].trim().to_string());
        }
    }
}

#[test]
fn a_second_process_on_a_directory_in_use_is_refused_at_once_and_the_lock_dies_with_its_holder() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(&dir);
    }
    let test = "a_second_process_on_a_directory_in_use_is_refused_at_once_and_the_lock_dies_with_its_holder";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // Another process holds the directory: this one is refused at once, told by whom.
    let (mut holder, said) = spawn_child(&data, test);
    assert_eq!(said, format!("LOCKED {}", holder.id()));
    let started = Instant::now();
    match FileStorage::open(&data, opts()) {
        Err(StorageError::InUse { path, pid }) => {
            assert_eq!(pid, Some(holder.id()), "names the holder");
            assert_eq!(path, data.join("LOCK"));
            let text = StorageError::InUse { path, pid }.to_string();
            assert!(text.contains("in use by process"), "{text}");
        }
        other => panic!("second open: {:?}", other.map(|s| s.last_index())),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "at once, no waiting"
    );
    // SIGKILL: the lock goes with the process.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let s = FileStorage::open(&data, opts()).expect("no stale lock after SIGKILL");
    assert_eq!(s.initial_state().unwrap().hard_state.term, 1);

    // The other way round: this process holds it, a child is refused.
    let (mut refused, said) = spawn_child(&data, test);
    assert_eq!(said, format!("IN_USE {}", std::process::id()));
    refused.wait().unwrap();
    drop(s);
    // Released on drop: a child gets it, then gives it back when its stdin closes.
    let (mut next, said) = spawn_child(&data, test);
    assert_eq!(said, format!("LOCKED {}", next.id()));
    drop(next.stdin.take());
    assert!(next.wait().unwrap().success());
    FileStorage::open(&data, opts()).expect("released by a clean exit");
}

#[test]
fn a_second_storage_in_the_same_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStorage::open(dir.path(), opts()).unwrap();
    match FileStorage::open(dir.path(), opts()) {
        Err(StorageError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("{:?}", other.map(|s| s.last_index())),
    }
    drop(first);
    FileStorage::open(dir.path(), opts()).unwrap();
}

#[test]
fn files_are_created_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a").join("node");
    {
        let mut s = FileStorage::open(&data, opts()).unwrap();
        s.append(&[Entry {
            index: 1,
            term: 1,
            payload: EntryPayload::Noop,
        }])
        .unwrap();
        s.sync().unwrap();
        s.save_snapshot(SnapshotMeta { index: 1, term: 1 }, b"one")
            .unwrap();
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&dir.path().join("a")), 0o700, "parents it created");
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "segment, snapshot and lock");
}

/// A node's storage lets go of the directory before `Node::shutdown` resolves, so a host can
/// start the node again on the same directory at once (the snapshot benchmark's restart got
/// `InUse` while the node thread still held it).
#[test]
fn a_node_s_directory_is_free_once_its_shutdown_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let net = raftkv::transport::LocalNetwork::new();
    for round in 0..3 {
        let storage = FileStorage::open(dir.path(), opts()).expect("reopen after shutdown");
        let mut config = raftkv::NodeConfig::new(1, vec![1]);
        config.tick_interval = Duration::from_millis(5);
        let (node, driver) = raftkv::Node::start(
            config,
            storage,
            raftkv::testing::RecordingMachine::default(),
            net.transport(1),
        )
        .unwrap();
        std::thread::spawn(move || futures::executor::block_on(driver));
        let deadline = Instant::now() + Duration::from_secs(10);
        while futures::executor::block_on(node.propose(format!("x{round}").as_str())).is_err() {
            assert!(Instant::now() < deadline, "no commit");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A long log in memory, so that taking the node apart takes a while.
        let batch: Vec<raftkv::raft::Payload> = (0..50_000)
            .map(|i| format!("{round}-{i}").as_str().into())
            .collect();
        for r in futures::executor::block_on(node.propose_many(batch)) {
            r.expect("committed");
        }
        futures::executor::block_on(node.shutdown());
    }
}

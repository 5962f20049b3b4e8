//! The bank example's ledger (`examples/bank/ledger.rs`, a custom state machine): its rules
//! one by one, its snapshots, and the replicated ledger in the simulated cluster under an
//! unreliable network and crashes. `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays.
//!
//! Checked to catch a real bug: a ledger whose `apply` refuses a transfer now and then by
//! the wall clock (non-deterministic) fails the simulation at seed 1 (the nodes diverge).

#[path = "../examples/bank/ledger.rs"]
mod ledger;

use ledger::{Command, Ledger, Outcome, Query, Refusal};
use raftkv::raft::{NodeId, Rng};
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, SimConfig};
use raftkv::StateMachine;

const ACCOUNTS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
const INITIAL: i64 = 100;

fn open(account: &str, initial: i64) -> Vec<u8> {
    let account = account.to_string();
    Command::Open { account, initial }.encode()
}

fn transfer(from: &str, to: &str, amount: i64) -> Vec<u8> {
    let (from, to) = (from.to_string(), to.to_string());
    Command::Transfer { from, to, amount }.encode()
}

fn balance(ledger: &Ledger, account: &str) -> Option<i64> {
    let query = Query::Balance {
        account: account.to_string(),
    }
    .encode();
    match ledger.query(&query) {
        Some(Outcome::Balance(b)) => Some(b),
        Some(Outcome::Refused(Refusal::UnknownAccount(_))) => None,
        other => panic!("balance query answered {other:?}"),
    }
}

fn total(ledger: &Ledger) -> i64 {
    match ledger.query(&Query::Total.encode()) {
        Some(Outcome::Total(t)) => t,
        other => panic!("total query answered {other:?}"),
    }
}

/// A ledger with alice and bob, 100 each.
fn alice_and_bob() -> Ledger {
    let mut l = Ledger::default();
    assert_eq!(l.apply(1, &open("alice", 100)), Outcome::Opened);
    assert_eq!(l.apply(2, &open("bob", 100)), Outcome::Opened);
    l
}

#[test]
fn a_transfer_moves_money_and_keeps_the_total() {
    let mut l = alice_and_bob();
    assert_eq!(
        l.apply(3, &transfer("alice", "bob", 30)),
        Outcome::Transferred
    );
    assert_eq!(
        l.apply(4, &transfer("bob", "alice", 130)),
        Outcome::Transferred
    );
    assert_eq!(
        (balance(&l, "alice"), balance(&l, "bob")),
        (Some(200), Some(0))
    );
    assert_eq!(total(&l), 200);
}

#[test]
fn refused_commands_say_why_and_change_nothing() {
    let mut l = alice_and_bob();
    let before = l.clone();
    let refusals = [
        (
            transfer("alice", "bob", 101),
            Refusal::InsufficientFunds {
                account: "alice".into(),
                balance: 100,
            },
        ),
        (
            transfer("mallory", "bob", 1),
            Refusal::UnknownAccount("mallory".into()),
        ),
        (
            transfer("alice", "mallory", 1),
            Refusal::UnknownAccount("mallory".into()),
        ),
        (transfer("alice", "bob", 0), Refusal::InvalidAmount(0)),
        (transfer("alice", "bob", -5), Refusal::InvalidAmount(-5)),
        (open("bob", 50), Refusal::AccountExists("bob".into())),
        (open("carol", -1), Refusal::InvalidAmount(-1)),
        (open("carol", i64::MAX), Refusal::InvalidAmount(i64::MAX)), // the total would overflow
        (b"not a command".to_vec(), Refusal::Malformed),
        (Vec::new(), Refusal::Malformed),
    ];
    for (i, (command, why)) in refusals.into_iter().enumerate() {
        assert_eq!(l.apply(3 + i as u64, &command), Outcome::Refused(why));
        assert_eq!(l, before, "a refused command changed the ledger");
    }
    assert_eq!(
        l.query(b"not a query"),
        Some(Outcome::Refused(Refusal::Malformed))
    );
}

#[test]
fn a_snapshot_restores_the_same_ledger_and_a_cut_one_is_refused() {
    let mut l = alice_and_bob();
    l.apply(3, &open("carol", 7));
    l.apply(4, &transfer("alice", "carol", 42));
    let mut bytes = Vec::new();
    l.snapshot().write_to(&mut bytes).unwrap();
    // The image is taken when `snapshot` returns: later commands do not change it.
    l.apply(5, &transfer("bob", "alice", 1));
    let mut restored = alice_and_bob(); // restore replaces everything, whatever was there
    restored.apply(3, &open("dave", 1));
    restored.restore(&mut bytes.as_slice()).unwrap();
    assert_eq!(balance(&restored, "carol"), Some(49));
    assert_eq!(balance(&restored, "dave"), None);
    assert_eq!(total(&restored), 207);
    restored.apply(5, &transfer("bob", "alice", 1));
    assert_eq!(
        restored, l,
        "replaying the tail after the snapshot gives the same ledger"
    );
    for cut in 0..bytes.len() {
        assert!(
            Ledger::default().restore(&mut &bytes[..cut]).is_err(),
            "a snapshot cut at byte {cut} was accepted"
        );
    }
}

/// Accounts open on `ledger` (the simulation checks the total against them).
fn opened(ledger: &Ledger) -> i64 {
    ACCOUNTS
        .iter()
        .filter(|a| balance(ledger, a).is_some())
        .count() as i64
}

/// Opens every account, retrying through leader changes. A retry of an `Open` that was in
/// fact applied is refused with `AccountExists`, which is as good.
fn open_accounts(c: &mut Cluster<Ledger>) {
    for name in ACCOUNTS {
        let mut done = false;
        for _ in 0..50 {
            let Some(leader) = c.run_until_leader(10_000) else {
                continue;
            };
            match c.propose_and_wait(leader, open(name, INITIAL), 2_000) {
                Some((_, Outcome::Opened | Outcome::Refused(Refusal::AccountExists(_)))) => {
                    done = true;
                    break;
                }
                Some((_, other)) => panic!("opening {name} answered {other:?}"),
                None => {}
            }
        }
        assert!(done, "could not open {name} (seed {})", c.seed());
    }
}

#[test]
fn replicated_ledgers_stay_identical_and_balanced_under_faults() {
    for_each_seed("bank_ledger_under_faults", 20, |seed| {
        let mut cfg = SimConfig::new(3, seed);
        // Half the seeds start as hosts do by default: every empty storage a lost disk.
        cfg.distrust_initial_storage = seed.is_multiple_of(2);
        cfg.network = NetworkConfig::unreliable();
        cfg.max_log_bytes = Some(2_000); // snapshots, compaction and installs happen
        let mut c = Cluster::new(cfg, |_| Ledger::default());
        let mut rng = Rng::new(seed ^ 0xBA4C);
        open_accounts(&mut c);

        let mut down: Option<NodeId> = None;
        for _ in 0..500 {
            // Transfers proposed to whoever leads now, not waited for: some get lost.
            if let Some(leader) = c.leader() {
                for _ in 0..rng.range(0, 4) {
                    let from = ACCOUNTS[rng.range(0, 5) as usize];
                    let to = ACCOUNTS[rng.range(0, 5) as usize];
                    let _ = c.propose(leader, transfer(from, to, rng.range(1, 80) as i64));
                }
            }
            c.run_for(10);
            match down {
                None if rng.chance(0.02) => {
                    let id = rng.range(1, 4);
                    c.crash(id);
                    down = Some(id);
                }
                Some(id) if rng.chance(0.05) => {
                    c.restart(id);
                    down = None;
                }
                _ => {}
            }
            // The invariant on every node, at every step: money is only ever added by
            // opening an account (a restarted node's ledger is rebuilt from its snapshot
            // and log, so it may not have reached every `Open` yet).
            for id in c.node_ids().into_iter().filter(|&id| c.is_up(id)) {
                let ledger = c.machine(id);
                assert_eq!(
                    total(ledger),
                    INITIAL * opened(ledger),
                    "node {id} lost or made money (seed {seed})"
                );
            }
        }

        // Heal, then let every node catch up with one more (refused) command.
        if let Some(id) = down {
            c.restart(id);
        }
        let mut synced = None;
        for _ in 0..20 {
            let Some(leader) = c.run_until_leader(10_000) else {
                continue;
            };
            if let Some((index, _)) = c.propose_and_wait(leader, transfer("alice", "bob", 0), 2_000)
            {
                synced = Some((leader, index));
                break;
            }
        }
        let (leader, index) = synced.unwrap_or_else(|| panic!("no final commit (seed {seed})"));
        let caught_up = c.run_until(20_000, |c| {
            c.node_ids()
                .iter()
                .all(|&id| c.status(id).is_some_and(|s| s.applied_index >= index))
        });
        assert!(caught_up, "nodes did not catch up (seed {seed})");
        for id in c.node_ids() {
            let ledger = c.machine(id);
            assert_eq!(
                ledger,
                c.machine(leader),
                "node {id} diverged (seed {seed})"
            );
            assert_eq!(
                opened(ledger),
                ACCOUNTS.len() as i64,
                "node {id} (seed {seed})"
            );
            assert_eq!(
                total(ledger),
                INITIAL * ACCOUNTS.len() as i64,
                "node {id} (seed {seed})"
            );
        }
        let transferred = c
            .acknowledged()
            .iter()
            .filter(|a| a.output == Outcome::Transferred)
            .count();
        assert!(
            transferred > 50,
            "only {transferred} transfers applied (seed {seed})"
        );
        let snapshots: u64 = c.node_ids().iter().map(|&id| c.snapshots_taken(id)).sum();
        assert!(snapshots > 0, "no snapshot was taken (seed {seed})");
    });
}

//! Log replication and agreement in the simulated cluster.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.

use std::cell::Cell;
use std::rc::Rc;

use raftkv::raft::{AppendResponse, Message, MessageBody, NodeId, Role};
use raftkv::testing::{for_each_seed, Cluster, RecordingMachine, SimConfig};

fn cluster(nodes: usize, seed: u64) -> Cluster<RecordingMachine> {
    Cluster::new(SimConfig::new(nodes, seed), |_| RecordingMachine::default())
}

/// Commands applied by `id`, as strings.
fn applied(c: &Cluster<RecordingMachine>, id: NodeId) -> Vec<String> {
    c.machine(id)
        .commands()
        .iter()
        .map(|(_, p)| String::from_utf8_lossy(p.as_bytes()).into_owned())
        .collect()
}

/// Three nodes on an ordered network (every message takes 2 ms), settled under a leader.
fn ordered_cluster(seed: u64) -> (Cluster<RecordingMachine>, NodeId) {
    let mut cfg = SimConfig::new(3, seed);
    cfg.network.min_delay_ms = 2;
    cfg.network.max_delay_ms = 2;
    let mut c = Cluster::new(cfg, |_| RecordingMachine::default());
    let leader = c.run_until_leader(3_000).expect("leader");
    c.run_for(200);
    (c, leader)
}

/// Counts (never drops) the messages from now on that `which` picks.
fn count_messages(
    c: &mut Cluster<RecordingMachine>,
    which: impl Fn(&Message) -> bool + 'static,
) -> Rc<Cell<u64>> {
    let count = Rc::new(Cell::new(0));
    let seen = count.clone();
    c.network.set_filter(move |m, _| {
        if which(m) {
            seen.set(seen.get() + 1);
        }
        false
    });
    count
}

#[test]
fn basic_agreement() {
    for_each_seed("basic_agreement", 20, |seed| {
        let mut c = cluster(5, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        for i in 0..20 {
            let (index, out) = c
                .propose_and_wait(leader, format!("c{i}").as_str(), 1_000)
                .expect("commit");
            assert_eq!(index, out);
        }
        c.run_for(500);
        let want: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        for id in c.node_ids() {
            assert_eq!(applied(&c, id), want, "node {id}");
        }
        c.assert_acknowledged_committed();
    });
}

#[test]
fn agreement_despite_a_disconnected_follower() {
    for_each_seed("disconnected_follower", 20, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        let f = c.node_ids().into_iter().find(|&i| i != leader).unwrap();
        c.propose_and_wait(leader, "a", 1_000).expect("commit");
        assert!(
            c.run_until(1_000, |c| applied(c, f).len() == 1),
            "follower applies via heartbeat"
        );
        c.isolate(f);
        // The remaining majority keeps committing.
        for cmd in ["b", "c", "d"] {
            let l = c.run_until_leader(3_000).expect("leader");
            c.propose_and_wait(l, cmd, 1_000)
                .expect("commit without the follower");
        }
        assert_eq!(applied(&c, f), vec!["a"]);
        // Back online, it catches up.
        c.reconnect(f);
        let ok = c.run_until(3_000, |c| applied(c, f).len() == 4);
        assert!(ok, "follower did not catch up: {:?}", applied(&c, f));
        assert_eq!(applied(&c, f), vec!["a", "b", "c", "d"]);
    });
}

#[test]
fn no_commit_without_a_majority() {
    for_each_seed("no_commit_without_majority", 20, |seed| {
        let mut c = cluster(5, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        c.propose_and_wait(leader, "before", 1_000).expect("commit");
        let commit = c.core(leader).unwrap().commit_index();
        let followers: Vec<_> = c.node_ids().into_iter().filter(|&i| i != leader).collect();
        // The leader keeps one follower: two of five is not a majority.
        c.partition(&[&[leader, followers[0]], &followers[1..]]);
        let p = c.propose(leader, "lonely").expect("still leader for now");
        c.run_for(300);
        assert_eq!(
            c.core(leader).map(|c| c.commit_index()),
            Some(commit),
            "committed without a majority"
        );
        assert!(!applied(&c, leader).contains(&"lonely".to_string()));
        // Heal: the entry commits if it survived the election, and is never applied otherwise.
        c.network.heal();
        let l = c.run_until_leader(5_000).expect("leader after heal");
        c.propose_and_wait(l, "after", 2_000)
            .expect("commit after heal");
        c.run_for(500);
        let log = applied(&c, l);
        let lonely = log.iter().filter(|s| *s == "lonely").count();
        assert!(lonely <= 1);
        if lonely == 0 {
            assert!(c
                .core(l)
                .unwrap()
                .log()
                .get(p.index)
                .is_none_or(|e| e.term != p.term));
        }
    });
}

#[test]
fn concurrent_proposals_are_batched_and_all_commit() {
    for_each_seed("concurrent_proposals", 20, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        c.run_for(100);
        c.network.reset_traffic();
        // 200 proposals arrive "at once" (before the core hands out its next batch).
        let mut proposed = Vec::new();
        for i in 0..200 {
            proposed.push(c.propose(leader, format!("p{i}").as_str()).expect("leader"));
        }
        let ok = c.run_until(2_000, |c| c.acknowledged().len() == 200);
        assert!(ok, "only {} of 200 committed", c.acknowledged().len());
        // One batch: one Append per follower carries all 200 entries (up to 256 fit), and no
        // entry is sent twice. An empty append may follow when a heartbeat answer overtakes
        // the acknowledgement (the leader checking for lost appends).
        let appends = c.network.traffic()["Append"];
        assert_eq!(appends.entries, 2 * 200, "entries re-sent");
        assert!(
            appends.count <= 4,
            "200 proposals took {} appends",
            appends.count
        );
        c.run_for(300);
        for id in c.node_ids() {
            assert_eq!(applied(&c, id).len(), 200);
        }
    });
}

#[test]
fn rejoining_partitioned_leader_discards_its_uncommitted_entries() {
    for_each_seed("rejoin_old_leader", 20, |seed| {
        let mut c = cluster(3, seed);
        let old = c.run_until_leader(3_000).expect("leader");
        c.propose_and_wait(old, "committed", 1_000).expect("commit");
        c.isolate(old);
        // The cut-off leader accepts proposals it can never commit.
        for i in 0..3 {
            let _ = c.propose(old, format!("lost{i}").as_str());
        }
        let new = c
            .run_until(3_000, |c| c.stable_leader().is_some_and(|l| l != old))
            .then(|| c.stable_leader().unwrap())
            .expect("new leader");
        c.propose_and_wait(new, "kept", 1_000)
            .expect("commit on the new leader");
        c.reconnect(old);
        let ok = c.run_until(3_000, |c| applied(c, old).len() == 2);
        assert!(ok);
        assert_eq!(applied(&c, old), vec!["committed", "kept"]);
        assert_eq!(c.status(old).unwrap().role, Role::Follower);
        let new_log = c.core(new).unwrap().log().entries().to_vec();
        c.run_for(300);
        assert_eq!(
            c.core(old).unwrap().log().entries(),
            &new_log[..],
            "logs did not converge"
        );
    });
}

#[test]
fn fast_backup_of_a_follower_with_many_divergent_entries() {
    for_each_seed("fast_backup", 10, |seed| {
        // 5 nodes. Leader A with followers B keeps leading a minority and piles up 50 entries
        // that never commit, in several terms; meanwhile the majority commits 50 others.
        let mut c = cluster(5, seed);
        let a = c.run_until_leader(3_000).expect("leader");
        c.propose_and_wait(a, "base", 1_000).expect("commit");
        let others: Vec<_> = c.node_ids().into_iter().filter(|&i| i != a).collect();
        let b = others[0];
        let majority = &others[1..];
        c.partition(&[&[a, b], majority]);
        for i in 0..50 {
            let _ = c.propose(a, format!("stale{i}").as_str());
        }
        c.run_for(200);
        let m = c
            .run_until(3_000, |c| {
                c.stable_leader().is_some_and(|l| majority.contains(&l))
            })
            .then(|| c.stable_leader().unwrap())
            .expect("majority leader");
        for i in 0..50 {
            let _ = c.propose(m, format!("new{i}").as_str());
        }
        assert!(c.run_until(3_000, |c| c.core(m).unwrap().commit_index() >= 53));
        // Now B alone joins the majority: it holds ~50 divergent entries.
        c.partition(&[&[a], &[b, majority[0], majority[1], majority[2]]]);
        c.network.reset_traffic();
        let target = c.core(m).unwrap().log().last_index();
        let ok = c.run_until(3_000, |c| c.core(b).unwrap().commit_index() >= target);
        assert!(ok, "B did not catch up");
        // Fast back-up skips a whole term per round trip: a handful of rejected probes, not 50.
        let rejections = c
            .network
            .traffic()
            .get("AppendResponse")
            .map_or(0, |t| t.count);
        assert!(
            rejections <= 10,
            "catching up took {rejections} append responses"
        );
        assert_eq!(
            c.core(b).unwrap().log().entries(),
            c.core(m).unwrap().log().entries()
        );
    });
}

#[test]
fn simple_agreement_sends_no_needless_messages() {
    for_each_seed("message_count", 20, |seed| {
        // An ordered network: on one that reorders, an empty append may overtake the entry
        // before it and be rejected, and then the leader probes.
        let (mut c, leader) = ordered_cluster(seed);
        c.network.reset_traffic();
        let rejected = count_messages(&mut c, |m| {
            matches!(
                m.body,
                MessageBody::AppendResponse(AppendResponse::Rejected { .. })
            )
        });
        for i in 0..10 {
            c.propose_and_wait(leader, format!("m{i}").as_str(), 1_000)
                .expect("commit");
        }
        let t = c.network.traffic();
        let count = |k: &str| t.get(k).map_or(0, |x| x.count);
        // Every entry leaves exactly once per follower: nothing is resent, nothing rejected.
        // Besides the 20 appends that carry them, a heartbeat whose answer overtakes an
        // acknowledgement (the leader checking for lost appends) may draw one empty append:
        // at most one per heartbeat. No elections.
        let appends = t["Append"];
        let heartbeats = count("Heartbeat");
        assert_eq!(appends.entries, 10 * 2, "entries resent");
        assert_eq!(rejected.get(), 0, "appends rejected");
        assert!(
            appends.count >= 10 * 2 && appends.count - 10 * 2 <= heartbeats,
            "{} appends, {heartbeats} heartbeats",
            appends.count
        );
        assert!(count("AppendResponse") <= appends.count);
        assert_eq!(count("Vote") + count("PreVote"), 0);
        // Heartbeats: one per follower per tick (10 ms) at most.
        let ticks = c.now() / 10 + 2;
        assert!(count("Heartbeat") <= 2 * ticks);
    });
}

#[test]
fn read_rounds_do_not_multiply_loss_checks() {
    for_each_seed("read_round_checks", 20, |seed| {
        let (mut c, leader) = ordered_cluster(seed);
        let empty = count_messages(
            &mut c,
            |m| matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty()),
        );
        // A write and a read every millisecond for 300 ms: there are always entries in
        // flight, and every read round travels as a heartbeat the followers answer.
        let start = c.now();
        let mut reads = Vec::new();
        for i in 0..300 {
            c.propose(leader, format!("w{i}").as_str()).expect("leader");
            reads.push(c.read(leader, "r").expect("leader"));
            c.run_for(1);
        }
        assert!(c.run_until(1_000, |c| reads.iter().all(|&t| c.read_done(t))));
        let ticks = (c.now() - start) / 10 + 1;
        // The loss check runs once per periodic heartbeat (every tick) and follower, at the
        // first answer after it: at most one empty append each, however many read rounds
        // were answered meanwhile.
        assert!(
            empty.get() <= 2 * ticks,
            "{} empty appends in {ticks} heartbeat intervals",
            empty.get()
        );
    });
}

#[test]
fn a_lost_append_is_settled_within_one_heartbeat() {
    for_each_seed("lost_append", 50, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        c.run_for(200);
        // The first append carrying an entry to each follower is lost; so is every other
        // message carrying one until both are lost (so no retry can be the original).
        let mut lost = std::collections::BTreeSet::new();
        c.network.set_filter(move |m, _| match &m.body {
            MessageBody::Append { entries, .. } if !entries.is_empty() => lost.insert(m.to),
            _ => false,
        });
        let start = c.now();
        let index = c.propose(leader, "once").expect("leader");
        assert!(
            c.run_until(1_000, |c| c.core(leader).unwrap().commit_index()
                >= index.index)
        );
        let waited = c.now() - start;
        // One heartbeat interval (10 ms) until the leader asks, then three round trips (the
        // heartbeat and its answer, the empty append and its rejection, the resent entry and
        // its acknowledgement; 1-3 ms each way, fsyncs up to 2 ms). The leader used to wait
        // for a second heartbeat.
        assert!(
            waited <= 10 + 3 * 8,
            "commit took {waited} ms after the loss"
        );
    });
}

#[test]
fn classic_helpers_commit_on_and_applied_count() {
    for_each_seed("commit_on", 10, |seed| {
        let mut c = cluster(5, seed);
        let i1 = c.commit_on("one", 5, 5_000).expect("all five apply it");
        assert_eq!(
            c.applied_count(i1),
            (5, Some(raftkv::raft::Payload::from("one")))
        );
        assert!(c.terms_agree());
        let old = c.stable_leader().unwrap();
        c.isolate(old);
        let i2 = c
            .commit_on("two", 4, 5_000)
            .expect("the connected four apply it");
        assert!(i2 > i1);
        // The lone old leader is still running but has not applied it, and lags a term.
        assert_eq!(c.applied_count(i2).0, 4);
        assert!(!c.terms_agree());
        c.reconnect(old);
        assert!(c.run_until(3_000, |c| c.terms_agree() && c.applied_count(i2).0 == 5));
    });
}

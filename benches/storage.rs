//! FileStorage benchmarks. Each figure is printed beside what it compares against.
//!
//! - `append_sync_1_writer/{raw_write_fdatasync,file_storage}/{100,1024}`: one entry appended
//!   and synced per iteration, against the raw limit measured in the same run and directory
//!   (one positioned write of the same size plus fdatasync on a plain preallocated file).
//! - `group_commit_64_writers/file_storage/100`: 64 writers (async tasks on one executor
//!   thread, as a node's clients are) push 100 B entries into a bounded queue, each waiting
//!   for its ack; one storage thread drains everything queued, appends it, syncs once and
//!   acks all (how the node driver uses storage). The time is per entry (amortized); mean batch size and
//!   mean per-entry latency are printed after the run.
//! - `recovery/open_1m_entries_100b`: `FileStorage::open` of a directory holding 1,000,000
//!   entries of 100 B; the peak memory of one open is measured in a child process (VmHWM,
//!   RssAnon, RssFile from /proc/self/status) and printed.
//!
//! - `watermark_cost` (printed, not a criterion group): what format 2's synced watermark adds
//!   to the append+sync path, measured *paired* so that a noisy shared disk cancels out: the
//!   old IO pattern (one `pwrite` of the batch + fdatasync) and the new one (the same, then a
//!   64-byte `pwrite` of the watermark slot in the file's first page, which the next
//!   fdatasync carries) alternate iteration by iteration on two preallocated files of the
//!   same directory; then `FileStorage` itself alternates with the raw floor. Medians and
//!   their ratio are printed. Iterations: `RAFTKV_BENCH_PAIRED` (default 2000);
//!   `RAFTKV_BENCH_PAIRED_ONLY=1` runs only this.
//!
//! The directory is `RAFTKV_BENCH_DIR` if set, else the system temp directory (it must be a
//! real disk, not tmpfs, for the fdatasync figures to mean anything).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use raftkv::raft::{Entry, EntryPayload};
use raftkv::storage::{FileStorage, FileStorageOptions, Storage};

const OPEN_CHILD_ENV: &str = "RAFTKV_BENCH_OPEN_CHILD";
const WRITERS: usize = 64;
const RECOVERY_ENTRIES: u64 = 1_000_000;

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 1,
        node_id: 1,
        ..Default::default()
    }
}

fn bench_root() -> PathBuf {
    std::env::var_os("RAFTKV_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn entry(index: u64, size: usize) -> Entry {
    Entry {
        index,
        term: 1,
        payload: EntryPayload::Command(vec![(index % 251) as u8; size].into()),
    }
}

fn append_sync_1_writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_sync_1_writer");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for size in [100usize, 1024] {
        let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
        // The raw limit: positioned write + fdatasync on a preallocated plain file.
        let raw_path = dir.path().join("raw");
        let raw = std::fs::File::create(&raw_path).expect("raw file");
        let raw_len = 64u64 << 20;
        write_zeroes(&raw, raw_len);
        let buf = vec![7u8; size];
        let mut offset = 0u64;
        group.bench_function(BenchmarkId::new("raw_write_fdatasync", size), |b| {
            b.iter(|| {
                use std::os::unix::fs::FileExt;
                raw.write_all_at(&buf, offset).expect("raw write");
                raw.sync_data().expect("raw fdatasync");
                offset = (offset + size as u64) % (raw_len - size as u64);
            })
        });
        let mut s = FileStorage::open(dir.path().join("storage"), opts()).expect("open");
        let mut next = 1;
        group.bench_function(BenchmarkId::new("file_storage", size), |b| {
            b.iter(|| {
                s.append(&[entry(next, size)]).expect("append");
                s.sync().expect("sync");
                next += 1;
            })
        });
    }
    group.finish();
}

fn write_zeroes(file: &std::fs::File, len: u64) {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        file.write_all_at(&chunk, off).expect("zero fill");
        off += chunk.len() as u64;
    }
    file.sync_all().expect("sync");
}

static BATCHES: AtomicU64 = AtomicU64::new(0);
static BATCHED_ENTRIES: AtomicU64 = AtomicU64::new(0);
static LATENCY_NANOS: AtomicU64 = AtomicU64::new(0);

/// Runs `total` proposals through the group-commit pipeline; returns the elapsed time.
fn group_commit_round(s: &mut FileStorage, total: u64) -> Duration {
    let per_writer = total.div_ceil(WRITERS as u64);
    type Ack = futures::channel::oneshot::Sender<()>;
    let (tx, rx) = mpsc::sync_channel::<(Vec<u8>, Ack)>(4 * WRITERS);
    let start = Instant::now();
    std::thread::scope(|scope| {
        // The writers: 64 tasks on one executor thread, as clients of a node are (each waits
        // for its ack before sending the next entry).
        scope.spawn(move || {
            let writers = (0..WRITERS).map(|_| {
                let tx = tx.clone();
                async move {
                    for _ in 0..per_writer {
                        let t = Instant::now();
                        let (ack_tx, ack_rx) = futures::channel::oneshot::channel();
                        tx.send((vec![1u8; 100], ack_tx)).expect("queue");
                        ack_rx.await.expect("ack");
                        LATENCY_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                }
            });
            futures::executor::block_on(futures::future::join_all(writers));
        });
        // The storage thread (this one): drain, append, sync once, ack all.
        let mut batch = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let base = s.last_index() + 1;
            let entries: Vec<Entry> = batch
                .iter()
                .enumerate()
                .map(|(i, (payload, _))| Entry {
                    index: base + i as u64,
                    term: 1,
                    payload: EntryPayload::Command(payload.clone().into()),
                })
                .collect();
            s.append(&entries).expect("append");
            s.sync().expect("sync");
            BATCHES.fetch_add(1, Ordering::Relaxed);
            BATCHED_ENTRIES.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for (_, ack) in batch.drain(..) {
                let _ = ack.send(());
            }
        }
    });
    let elapsed = start.elapsed();
    // Criterion divides by `total`; the writers may have done a few more (rounding up).
    elapsed.mul_f64(total as f64 / (per_writer * WRITERS as u64) as f64)
}

fn group_commit_64_writers(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let mut s = FileStorage::open(dir.path(), opts()).expect("open");
    let mut group = c.benchmark_group("group_commit_64_writers");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    group.bench_function(BenchmarkId::new("file_storage", 100), |b| {
        b.iter_custom(|iters| group_commit_round(&mut s, iters.max(WRITERS as u64)))
    });
    group.finish();
    let batches = BATCHES.load(Ordering::Relaxed).max(1);
    let entries = BATCHED_ENTRIES.load(Ordering::Relaxed);
    println!(
        "group commit: {entries} entries in {batches} syncs, mean batch {:.1} entries, \
         mean append-to-ack latency {:.3} ms",
        entries as f64 / batches as f64,
        LATENCY_NANOS.load(Ordering::Relaxed) as f64 / entries.max(1) as f64 / 1e6
    );
}

fn build_recovery_dir(dir: &Path) {
    let mut s = FileStorage::open(dir, opts()).expect("open");
    let mut next = 1;
    while next <= RECOVERY_ENTRIES {
        let batch: Vec<Entry> = (next..next + 1000).map(|i| entry(i, 100)).collect();
        s.append(&batch).expect("append");
        s.sync().expect("sync");
        next += 1000;
    }
}

fn recovery(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let t = Instant::now();
    build_recovery_dir(dir.path());
    println!(
        "recovery: wrote {RECOVERY_ENTRIES} entries of 100 B in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut group = c.benchmark_group("recovery");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("open_1m_entries_100b", |b| {
        b.iter(|| {
            let s = FileStorage::open(dir.path(), opts()).expect("open");
            assert_eq!(s.last_index(), RECOVERY_ENTRIES);
            s
        })
    });
    group.finish();
    // Peak memory of one open, in a fresh process.
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env(OPEN_CHILD_ENV, dir.path())
        .output()
        .expect("child");
    print!(
        "recovery memory (one open, fresh process): {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Child mode: open once, report memory.
fn open_child(dir: &Path) {
    let t = Instant::now();
    let s = FileStorage::open(dir, opts()).expect("open");
    let elapsed = t.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map_or("n/a".to_string(), |l| l[name.len()..].trim().to_string())
    };
    println!(
        "open {:.0} ms, {} entries in {} segments, index heap {:.1} MiB, VmHWM {}, RssAnon {}, RssFile {}",
        elapsed.as_secs_f64() * 1e3,
        s.last_index(),
        s.segment_count(),
        s.index_heap_bytes() as f64 / (1 << 20) as f64,
        field("VmHWM:"),
        field("RssAnon:"),
        field("RssFile:")
    );
}

/// Median of `v` (sorted in place), in microseconds.
fn median_us(v: &mut [Duration]) -> f64 {
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// The paired measurement described in the module docs.
fn watermark_cost() {
    use std::os::unix::fs::FileExt;
    let iterations: usize = std::env::var("RAFTKV_BENCH_PAIRED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let len = 64u64 << 20;
    let files: Vec<std::fs::File> = ["old", "new"]
        .iter()
        .map(|name| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .expect("file");
            write_zeroes(&f, len);
            f
        })
        .collect();
    let batch = vec![7u8; 108]; // one 100 B entry, framed
    let slot = [9u8; 64];
    let (mut old, mut new) = (Vec::new(), Vec::new());
    let mut offset = 1536u64;
    for i in 0..iterations {
        // Alternate which pattern goes first, so neither always follows the other.
        for k in 0..2 {
            let which = (i + k) % 2;
            let f = &files[which];
            let t = Instant::now();
            f.write_all_at(&batch, offset).expect("write");
            f.sync_data().expect("fdatasync");
            if which == 1 {
                f.write_all_at(&slot, 512 + 512 * (i as u64 % 2))
                    .expect("slot");
            }
            let d = t.elapsed();
            if which == 0 {
                old.push(d)
            } else {
                new.push(d)
            }
        }
        offset += batch.len() as u64;
    }
    let (o, n) = (median_us(&mut old), median_us(&mut new));
    println!(
        "watermark_cost: {iterations} alternating iterations, median write+fdatasync {o:.1} µs \
         (format 1's pattern) vs write+fdatasync+watermark write {n:.1} µs (format 2's): \
         {:+.1}%",
        (n / o - 1.0) * 100.0
    );
    // FileStorage itself beside the raw floor, alternating.
    let mut s = FileStorage::open(dir.path().join("storage"), opts()).expect("open");
    let (mut raw, mut fs) = (Vec::new(), Vec::new());
    let mut offset = 1536u64;
    for i in 0..iterations as u64 {
        let t = Instant::now();
        files[0].write_all_at(&batch, offset).expect("write");
        files[0].sync_data().expect("fdatasync");
        raw.push(t.elapsed());
        offset += batch.len() as u64;
        let t = Instant::now();
        s.append(&[entry(i + 1, 100)]).expect("append");
        s.sync().expect("sync");
        fs.push(t.elapsed());
    }
    let (r, f) = (median_us(&mut raw), median_us(&mut fs));
    println!(
        "watermark_cost: FileStorage append+sync of 100 B, median {f:.1} µs beside the raw \
         write+fdatasync floor {r:.1} µs in the same loop ({:+.1}%)",
        (f / r - 1.0) * 100.0
    );
}

criterion_group!(
    benches,
    append_sync_1_writer,
    group_commit_64_writers,
    recovery
);

fn main() {
    if let Some(dir) = std::env::var_os(OPEN_CHILD_ENV) {
        open_child(Path::new(&dir));
        return;
    }
    if std::env::var_os("RAFTKV_BENCH_PAIRED_ONLY").is_none() {
        benches();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
    }
    if std::env::args().all(|a| a != "--list" && a != "--test") {
        watermark_cost();
    }
}

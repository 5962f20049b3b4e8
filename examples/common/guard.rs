//! What the demo node's two ports (`tcp.rs` for peers, `client_proto.rs` for clients) use to
//! defend themselves: the shared-secret handshake, a byte budget for frames being received,
//! a table of connection slots with eviction, and a limiter for repeated log lines.
//!
//! Included by `tcp.rs` and `client_proto.rs` as a child module
//! (`#[path = "guard.rs"] pub mod guard;`), so each has its own copy; nothing here is global.
//!
//! # The handshake (both ports)
//! Fixed-size messages, so nothing is allocated from what a stranger sends:
//!
//! ```text
//! server -> dialer  Challenge  magic[8] | cluster u64 | node u64 | inc_s u64 | nonce_s[32]  64 B
//! dialer -> server  Hello      magic[8] | cluster u64 | from u64 | to u64 | inc_d u64
//!                              | listen[18] | nonce_d[32] | mac[32]                       122 B
//! server -> dialer  Answer     magic[8] | status u8 | known u64 | mac[32]                  49 B
//! ```
//!
//! (integers little-endian). `inc_s` and `inc_d` are the two nodes' incarnations (the id of
//! their data directories; 0 on the client port), and `known` is the incarnation the server
//! last saw of the dialer's node id (0 if none): how a node with a new data directory learns
//! that the cluster knew its id under another one. `listen` is the dialer's own Raft address
//! (IPv6, IPv4 mapped, then the port; all zero on the client port): how a node that does not
//! know a peer yet can answer it. The dialer's `mac` is HMAC-SHA256 over a label naming the
//! port and direction, then `cluster | from | to | inc_s | inc_d | listen | nonce_s |
//! nonce_d`, keyed with the shared secret; the server's answer carries the same plus `known`
//! over the reply label, proving the server knows the secret too (and binding the
//! incarnations: neither can be changed on the path unnoticed). The server's nonce is fresh for every connection, so a recorded
//! Hello replayed on another connection fails. Without a secret the key is empty: the same
//! exchange, proving nothing, and a node with a secret refuses a dialer without one (and the
//! other way round).
//!
//! The challenge names the cluster and the node to anyone who connects (neither is a secret;
//! it lets a misconfigured dialer be told exactly what it reached). This authenticates who
//! opens a connection; it does not encrypt or protect the traffic
//! that follows against someone who can see or change it on the path (use TLS or a VPN
//! between hosts for that).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce and of a MAC.
pub const NONCE_LEN: usize = 32;
/// Bytes of a [`Challenge`].
pub const CHALLENGE_LEN: usize = 8 + 8 + 8 + 8 + NONCE_LEN;
/// Bytes of a [`Hello`].
pub const HELLO_LEN: usize = 8 + 8 + 8 + 8 + 8 + ADDR_LEN + NONCE_LEN + NONCE_LEN;
/// Bytes of an address in a [`Hello`].
pub const ADDR_LEN: usize = 18;
/// Bytes of the server's answer.
pub const ANSWER_LEN: usize = 8 + 1 + 8 + NONCE_LEN;

/// A shared secret (or none). The bytes are never printed.
#[derive(Clone, Default)]
pub struct Secret(Option<Arc<Vec<u8>>>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => write!(f, "Secret(set)"),
            None => write!(f, "Secret(none)"),
        }
    }
}

impl Secret {
    /// No secret: the handshake proves nothing.
    pub fn none() -> Self {
        Secret(None)
    }

    /// A secret of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Some(Arc::new(bytes.into())))
    }

    /// Whether a secret is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Reads a secret from `path`: its bytes without trailing whitespace, at least 16 of
    /// them. Returns a warning too if the file is readable by others than its owner.
    pub fn from_file(path: &Path) -> Result<(Self, Option<String>), String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < 16 {
            return Err(format!(
                "{}: a secret needs at least 16 bytes (it has {end})",
                path.display()
            ));
        }
        let mut warning = None;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    warning = Some(format!(
                        "{} is readable by others (mode {:o}); chmod 600 it",
                        path.display(),
                        meta.permissions().mode() & 0o777
                    ));
                }
            }
        }
        Ok((Secret::new(bytes[..end].to_vec()), warning))
    }

    fn key(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// HMAC-SHA256 of `label` then `parts`, keyed with the secret.
    pub fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; NONCE_LEN] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.key())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `label` and `parts` (compared in constant time).
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.key())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
    }
}

/// A random number from the operating system (the first bytes of a [`nonce`]).
pub fn random_u64() -> std::io::Result<u64> {
    let n = nonce()?;
    Ok(u64_at(&n, 0))
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

/// Which port a handshake is for; each has its own magic and MAC labels, so a message of one
/// is worthless on the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Raft traffic between nodes.
    Peer,
    /// Clients of the KV service.
    Client,
}

impl Port {
    fn magic(self, kind: u8) -> [u8; 8] {
        let mut m = *match self {
            Port::Peer => b"RKVPEER0",
            Port::Client => b"RKVCLNT0",
        };
        m[7] = kind;
        m
    }
    fn hello_label(self) -> &'static [u8] {
        match self {
            Port::Peer => b"raftkv peer hello v2",
            Port::Client => b"raftkv client hello v2",
        }
    }
    fn answer_label(self) -> &'static [u8] {
        match self {
            Port::Peer => b"raftkv peer answer v2",
            Port::Client => b"raftkv client answer v2",
        }
    }
}

/// Why a handshake failed, as the server tells the dialer (and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The dialer belongs to another cluster.
    WrongCluster = 1,
    /// The dialer meant another node (its `--peers` has another address for this one).
    WrongNode = 2,
    /// The dialer's id is not a member of this cluster.
    UnknownPeer = 3,
    /// The proof is wrong: the dialer does not have this node's secret (or has one and this
    /// node has none).
    BadProof = 4,
    /// The dialer's incarnation of its node id is older than one this node has seen: it runs
    /// on a data directory that a newer one replaced (see `incarnations.rs`).
    RetiredIncarnation = 5,
}

impl Refusal {
    fn from_code(code: u8) -> Option<Refusal> {
        [
            Refusal::WrongCluster,
            Refusal::WrongNode,
            Refusal::UnknownPeer,
            Refusal::BadProof,
            Refusal::RetiredIncarnation,
        ]
        .into_iter()
        .find(|r| *r as u8 == code)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::WrongCluster => "the dialer belongs to another cluster",
            Refusal::WrongNode => "the dialer meant another node id at this address",
            Refusal::UnknownPeer => "the dialer's node id is not a member of the cluster",
            Refusal::BadProof => "the dialer's secret is wrong or missing",
            Refusal::RetiredIncarnation => {
                "the dialer runs on a data directory that a newer incarnation of its node id \
                 replaced"
            }
        })
    }
}

/// The server's first message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The server's cluster.
    pub cluster: u64,
    /// The server's node id.
    pub node: u64,
    /// The server's incarnation (0 on the client port).
    pub incarnation: u64,
    /// Fresh for this connection.
    pub nonce: [u8; NONCE_LEN],
}

/// The dialer's answer to a [`Challenge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The cluster the dialer belongs to.
    pub cluster: u64,
    /// The dialer's node id (0 for a client).
    pub from: u64,
    /// The node it means to reach.
    pub to: u64,
    /// The dialer's incarnation (0 for a client).
    pub incarnation: u64,
    /// The dialer's own Raft address, if it has one (`None` for a client).
    pub listen: Option<SocketAddr>,
    /// The dialer's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The proof.
    pub mac: [u8; NONCE_LEN],
}

impl Hello {
    /// A client's hello to the node that sent `challenge`, before [`make_hello`] seals it.
    pub fn client(challenge: &Challenge) -> Hello {
        Hello::peer(challenge.cluster, 0, challenge.node, 0, None)
    }

    /// Node `from`'s hello (incarnation `incarnation`, Raft address `listen`) to node `to`
    /// of cluster `cluster`, before [`make_hello`] seals it.
    pub fn peer(
        cluster: u64,
        from: u64,
        to: u64,
        incarnation: u64,
        listen: Option<SocketAddr>,
    ) -> Hello {
        Hello {
            cluster,
            from,
            to,
            incarnation,
            listen,
            nonce: [0; NONCE_LEN],
            mac: [0; NONCE_LEN],
        }
    }
}

/// `addr` as [`ADDR_LEN`] bytes (all zero for none).
fn addr_bytes(addr: Option<SocketAddr>) -> [u8; ADDR_LEN] {
    let mut b = [0u8; ADDR_LEN];
    if let Some(a) = addr {
        let ip = match a {
            SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
            SocketAddr::V6(v6) => *v6.ip(),
        };
        b[..16].copy_from_slice(&ip.octets());
        b[16..].copy_from_slice(&a.port().to_le_bytes());
    }
    b
}

/// The address of [`addr_bytes`] (`None` for port 0).
fn addr_from(b: &[u8]) -> Option<SocketAddr> {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let port = u16::from_le_bytes([b[16], b[17]]);
    if port == 0 {
        return None;
    }
    let ip = Ipv6Addr::from(ip);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), port),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    })
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed, closed, or did not answer in time.
    Io(std::io::Error),
    /// The bytes are not this handshake (another protocol, a port of the other kind).
    NotHandshake,
    /// The server refused us (dialer side) or we refused the dialer (server side).
    Refused(Refusal),
    /// The server's answer does not prove it knows the secret.
    ServerUnproven,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "handshake: {e}"),
            HandshakeError::NotHandshake => {
                write!(f, "handshake: the other side does not speak this protocol")
            }
            HandshakeError::Refused(r) => write!(f, "handshake refused: {r}"),
            HandshakeError::ServerUnproven => write!(
                f,
                "handshake: the server could not prove it has the secret (wrong or missing secret)"
            ),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The fields a proof covers, as bytes: `cluster | from | to | inc_s | inc_d` (then the two
/// nonces, and for the answer `known`).
fn proof_fields(challenge: &Challenge, hello: &Hello) -> [[u8; 8]; 5] {
    [
        hello.cluster.to_le_bytes(),
        hello.from.to_le_bytes(),
        hello.to.to_le_bytes(),
        challenge.incarnation.to_le_bytes(),
        hello.incarnation.to_le_bytes(),
    ]
}

/// What the dialer's proof covers, after its label: the fields, the address, then the two
/// nonces.
fn hello_parts<'a>(
    fields: &'a [[u8; 8]; 5],
    listen: &'a [u8; ADDR_LEN],
    challenge: &'a Challenge,
    hello: &'a Hello,
) -> [&'a [u8]; 8] {
    let f = fields;
    [
        &f[0],
        &f[1],
        &f[2],
        &f[3],
        &f[4],
        listen,
        &challenge.nonce,
        &hello.nonce,
    ]
}

/// What the server's proof covers, after its label: the dialer's parts, then `known`.
fn answer_parts<'a>(
    fields: &'a [[u8; 8]; 5],
    listen: &'a [u8; ADDR_LEN],
    challenge: &'a Challenge,
    hello: &'a Hello,
    known: &'a [u8; 8],
) -> [&'a [u8]; 9] {
    let [a, b, c, d, e, f, g, h] = hello_parts(fields, listen, challenge, hello);
    [a, b, c, d, e, f, g, h, known]
}

/// Server side, step 1: sends a fresh challenge.
pub async fn send_challenge<W: AsyncWrite + Unpin>(
    w: &mut W,
    port: Port,
    cluster: u64,
    node: u64,
    incarnation: u64,
) -> Result<Challenge, HandshakeError> {
    let c = Challenge {
        cluster,
        node,
        incarnation,
        nonce: nonce()?,
    };
    let mut b = Vec::with_capacity(CHALLENGE_LEN);
    b.extend_from_slice(&port.magic(b'C'));
    b.extend_from_slice(&cluster.to_le_bytes());
    b.extend_from_slice(&node.to_le_bytes());
    b.extend_from_slice(&incarnation.to_le_bytes());
    b.extend_from_slice(&c.nonce);
    w.write_all(&b).await?;
    Ok(c)
}

/// Server side, step 2: reads the dialer's hello (the caller bounds the time).
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    port: Port,
) -> Result<Hello, HandshakeError> {
    let mut b = [0u8; HELLO_LEN];
    r.read_exact(&mut b).await?;
    if b[..8] != port.magic(b'H') {
        return Err(HandshakeError::NotHandshake);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[58..90]);
    let mut mac = [0u8; NONCE_LEN];
    mac.copy_from_slice(&b[90..122]);
    Ok(Hello {
        cluster: u64_at(&b, 8),
        from: u64_at(&b, 16),
        to: u64_at(&b, 24),
        incarnation: u64_at(&b, 32),
        listen: addr_from(&b[40..58]),
        nonce,
        mac,
    })
}

/// Server side, step 3: checks `hello` against the challenge and `secret` (the cluster and
/// node checks come first, so a stranger learns why only for mistakes anyone could see).
pub fn check_hello(
    port: Port,
    secret: &Secret,
    challenge: &Challenge,
    hello: &Hello,
) -> Result<(), Refusal> {
    if hello.cluster != challenge.cluster {
        return Err(Refusal::WrongCluster);
    }
    if hello.to != challenge.node {
        return Err(Refusal::WrongNode);
    }
    let (fields, listen) = (proof_fields(challenge, hello), addr_bytes(hello.listen));
    let parts = hello_parts(&fields, &listen, challenge, hello);
    if !secret.verify(port.hello_label(), &parts, &hello.mac) {
        return Err(Refusal::BadProof);
    }
    Ok(())
}

/// Server side, step 4: accepts (with the server's proof, covering `known`: the incarnation
/// this server last saw of the dialer's node id, 0 if none) or refuses.
pub async fn send_answer<W: AsyncWrite + Unpin>(
    w: &mut W,
    port: Port,
    secret: &Secret,
    challenge: &Challenge,
    hello: &Hello,
    verdict: Result<u64, Refusal>,
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(ANSWER_LEN);
    b.extend_from_slice(&port.magic(b'A'));
    match verdict {
        Ok(known) => {
            b.push(0);
            let known = known.to_le_bytes();
            b.extend_from_slice(&known);
            let (fields, listen) = (proof_fields(challenge, hello), addr_bytes(hello.listen));
            let parts = answer_parts(&fields, &listen, challenge, hello, &known);
            b.extend_from_slice(&secret.mac(port.answer_label(), &parts));
        }
        Err(r) => {
            b.push(r as u8);
            b.extend_from_slice(&[0u8; 8 + NONCE_LEN]);
        }
    }
    w.write_all(&b).await?;
    w.flush().await
}

/// Dialer side, step 1: reads the server's challenge.
pub async fn read_challenge<R: AsyncRead + Unpin>(
    r: &mut R,
    port: Port,
) -> Result<Challenge, HandshakeError> {
    let mut b = [0u8; CHALLENGE_LEN];
    r.read_exact(&mut b).await?;
    if b[..8] != port.magic(b'C') {
        return Err(HandshakeError::NotHandshake);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[32..64]);
    Ok(Challenge {
        cluster: u64_at(&b, 8),
        node: u64_at(&b, 16),
        incarnation: u64_at(&b, 24),
        nonce,
    })
}

/// Dialer side, step 2: seals `hello` ([`Hello::peer`], [`Hello::client`]) as the answer
/// to `challenge`: a fresh nonce and the proof (write it with [`hello_bytes`]).
pub fn make_hello(
    port: Port,
    secret: &Secret,
    challenge: &Challenge,
    mut hello: Hello,
) -> std::io::Result<Hello> {
    hello.nonce = nonce()?;
    let (fields, listen) = (proof_fields(challenge, &hello), addr_bytes(hello.listen));
    hello.mac = secret.mac(
        port.hello_label(),
        &hello_parts(&fields, &listen, challenge, &hello),
    );
    Ok(hello)
}

/// The bytes of `hello`.
pub fn hello_bytes(port: Port, hello: &Hello) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&port.magic(b'H'));
    b.extend_from_slice(&hello.cluster.to_le_bytes());
    b.extend_from_slice(&hello.from.to_le_bytes());
    b.extend_from_slice(&hello.to.to_le_bytes());
    b.extend_from_slice(&hello.incarnation.to_le_bytes());
    b.extend_from_slice(&addr_bytes(hello.listen));
    b.extend_from_slice(&hello.nonce);
    b.extend_from_slice(&hello.mac);
    b
}

/// Dialer side, step 3: reads the server's answer and checks its proof. Returns `known`: the
/// incarnation the server last saw of our node id (0 if none).
pub async fn read_answer<R: AsyncRead + Unpin>(
    r: &mut R,
    port: Port,
    secret: &Secret,
    challenge: &Challenge,
    hello: &Hello,
) -> Result<u64, HandshakeError> {
    let mut b = [0u8; ANSWER_LEN];
    r.read_exact(&mut b).await?;
    if b[..8] != port.magic(b'A') {
        return Err(HandshakeError::NotHandshake);
    }
    if b[8] != 0 {
        return Err(
            Refusal::from_code(b[8]).map_or(HandshakeError::NotHandshake, HandshakeError::Refused)
        );
    }
    let mut known = [0u8; 8];
    known.copy_from_slice(&b[9..17]);
    let (fields, listen) = (proof_fields(challenge, hello), addr_bytes(hello.listen));
    let parts = answer_parts(&fields, &listen, challenge, hello, &known);
    if !secret.verify(port.answer_label(), &parts, &b[17..]) {
        return Err(HandshakeError::ServerUnproven);
    }
    Ok(u64::from_le_bytes(known))
}

/// Bytes of frames being received, bounded across every connection of a port. A large
/// frame's length is reserved here before its body is read (its buffer still grows only as
/// bytes arrive); a connection that cannot reserve waits, holding nothing (it stops reading,
/// so its sender stalls), until its frame's deadline.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    units: Arc<Semaphore>,
    total: usize,
}

/// Budget is counted in units of this many bytes.
const BUDGET_UNIT: usize = 4096;

impl ByteBudget {
    /// A budget of `bytes` (rounded up to whole 4 KiB units).
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(BUDGET_UNIT);
        ByteBudget {
            units: Arc::new(Semaphore::new(units)),
            total: units * BUDGET_UNIT,
        }
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.units.available_permits() * BUDGET_UNIT
    }

    /// Reserves `bytes` more for `held`, waiting for them until `deadline`; false if the
    /// deadline passed first (or the request exceeds the whole budget).
    pub async fn reserve(&self, held: &mut Reservation, bytes: usize, deadline: Instant) -> bool {
        let units = bytes.div_ceil(BUDGET_UNIT);
        let Ok(units32) = u32::try_from(units) else {
            return false;
        };
        if units * BUDGET_UNIT > self.total {
            return false;
        }
        let acquire = self.units.acquire_many(units32);
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(permit)) => {
                permit.forget();
                held.units += units;
                held.budget = Some(self.units.clone());
                true
            }
            _ => false,
        }
    }
}

/// Budget held by one buffer; given back when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    budget: Option<Arc<Semaphore>>,
    units: usize,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.units * BUDGET_UNIT
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.add_permits(self.units);
        }
    }
}

/// Reads exactly `len` bytes into a buffer that grows (doubling, never past `len`) only as
/// bytes arrive; the whole read must end by `deadline`. A frame longer than `free` first
/// reserves its whole length from `budget` (accounting only: nothing is allocated for bytes
/// that have not arrived), so connections never hold part of the budget while waiting for
/// the rest — a connection waits holding nothing, and one that has its reservation keeps
/// reading (and notices at once if its peer goes away). Returns the bytes and the
/// reservation covering them (keep it while the bytes are held). Without a budget the buffer
/// still grows only as bytes arrive.
pub async fn read_budgeted<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    free: usize,
    budget: Option<&ByteBudget>,
    deadline: Instant,
) -> Result<(Vec<u8>, Reservation), BudgetedReadError> {
    let mut held = Reservation::default();
    if len > free {
        if let Some(budget) = budget {
            if !budget.reserve(&mut held, len, deadline).await {
                return Err(BudgetedReadError::NoBudget);
            }
        }
    }
    let mut buf: Vec<u8> = Vec::new();
    buf.reserve_exact(len.min(free.max(1)));
    while buf.len() < len {
        if buf.len() == buf.capacity() {
            let grow = buf.capacity().min(len - buf.len()).max(1);
            buf.reserve_exact(grow);
        }
        // Into the spare capacity, without zeroing it first, and never past `len`.
        let mut limited = (&mut *r).take((len - buf.len()) as u64);
        let read = tokio::time::timeout_at(deadline.into(), limited.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Err(BudgetedReadError::TooSlow),
            Ok(Err(e)) => return Err(BudgetedReadError::Io(e)),
            Ok(Ok(0)) => {
                return Err(BudgetedReadError::Io(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(Ok(_)) => {}
        }
    }
    Ok((buf, held))
}

/// Why [`read_budgeted`] failed.
#[derive(Debug)]
pub enum BudgetedReadError {
    /// The socket failed or closed mid-frame.
    Io(std::io::Error),
    /// The frame's bytes did not all arrive by its deadline.
    TooSlow,
    /// Other connections hold the whole budget until past this frame's deadline.
    NoBudget,
}

/// The time a frame of `len` bytes may take to arrive: `base`, plus one second per MiB (so a
/// connection cannot hold a buffer by trickling bytes).
pub fn frame_deadline(start: Instant, base: Duration, len: usize) -> Instant {
    start + base + Duration::from_secs((len >> 20) as u64)
}

/// What one connection slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Accepted, handshake not done.
    Handshake,
    /// Waiting for its next request (clients).
    Idle,
    /// Reading or serving a request (clients).
    Busy,
    /// An authenticated peer, by node id.
    Peer(u64),
}

struct Slot {
    state: SlotState,
    since: Instant,
    abort: Option<AbortHandle>,
}

/// The connections of one port: what each is doing and since when, so the accept loop can
/// evict the one that has waited longest instead of refusing a newcomer, and a peer that
/// reconnects can replace its old connection.
#[derive(Clone, Default)]
pub struct Slots(Arc<Mutex<SlotsInner>>);

#[derive(Default)]
struct SlotsInner {
    next: u64,
    slots: HashMap<u64, Slot>,
}

/// A connection's place in [`Slots`]; dropping it (the connection task ending or being
/// aborted) frees the slot.
pub struct SlotGuard {
    slots: Slots,
    id: u64,
}

impl Slots {
    /// Takes a slot in the handshake state.
    pub fn open(&self) -> SlotGuard {
        let mut inner = self.0.lock();
        inner.next += 1;
        let id = inner.next;
        inner.slots.insert(
            id,
            Slot {
                state: SlotState::Handshake,
                since: Instant::now(),
                abort: None,
            },
        );
        SlotGuard {
            slots: self.clone(),
            id,
        }
    }

    /// Slots whose state passes `filter`.
    pub fn count(&self, filter: impl Fn(SlotState) -> bool) -> usize {
        self.0
            .lock()
            .slots
            .values()
            .filter(|s| filter(s.state))
            .count()
    }

    /// Records the task to abort to close connection `id` (see [`SlotGuard::id`]).
    pub fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(s) = self.0.lock().slots.get_mut(&id) {
            s.abort = Some(abort);
        }
    }

    /// Closes the slot that has been in a state passing `filter` the longest; false if none.
    pub fn evict_oldest(&self, filter: impl Fn(SlotState) -> bool) -> bool {
        let mut inner = self.0.lock();
        let oldest = inner
            .slots
            .iter()
            .filter(|(_, s)| filter(s.state))
            .min_by_key(|(_, s)| s.since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| inner.slots.remove(&id)) {
            Some(slot) => {
                if let Some(a) = slot.abort {
                    a.abort();
                }
                true
            }
            None => false,
        }
    }
}

impl SlotGuard {
    /// This slot's id (for [`Slots::set_abort`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Moves to `state` (restarting its clock).
    pub fn set(&self, state: SlotState) {
        if let Some(s) = self.slots.0.lock().slots.get_mut(&self.id) {
            s.state = state;
            s.since = Instant::now();
        }
    }

    /// Becomes peer `peer`'s connection, closing any other it had; returns how many it
    /// replaced.
    pub fn claim_peer(&self, peer: u64) -> usize {
        let mut inner = self.slots.0.lock();
        let old: Vec<u64> = inner
            .slots
            .iter()
            .filter(|(id, s)| **id != self.id && s.state == SlotState::Peer(peer))
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            if let Some(slot) = inner.slots.remove(id) {
                if let Some(a) = slot.abort {
                    a.abort();
                }
            }
        }
        if let Some(s) = inner.slots.get_mut(&self.id) {
            s.state = SlotState::Peer(peer);
            s.since = Instant::now();
        }
        old.len()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.0.lock().slots.remove(&self.id);
    }
}

/// Lets a kind of log line through at most `burst` times per `window`, counting the rest.
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    /// At most `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        LogLimiter {
            window,
            burst,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed)` if a line may be logged now (`suppressed` lines were dropped since
    /// the last one that was), `None` if this one is to be dropped.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock();
        let now = Instant::now();
        if now.duration_since(s.0) >= self.window {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.burst {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

//! A framing codec for Raft traffic between nodes over a byte stream (TCP, a pipe, ...).
//!
//! The core codec is synchronous and runtime-agnostic: [`encode`] turns a [`Frame`] into bytes,
//! and a [`FrameDecoder`] takes bytes as they arrive and hands back whole frames. For sockets
//! that implement `futures::io::{AsyncRead, AsyncWrite}` there are [`read_frame`] and
//! [`write_frame`]; a tokio host can either adapt its sockets (tokio-util's `compat`) or run its
//! own read loop around a [`FrameDecoder`].
//!
//! # Format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       4     length: bytes after this field (u32, little-endian)
//! 4       1     format version (1)
//! 5       8     cluster id (u64, little-endian)
//! 13      n     postcard encoding of the Frame
//! 13+n    4     crc32 (crc32fast) of bytes 4..13+n: version, cluster id and payload (u32, LE)
//! ```
//!
//! So `length = n + 13` and is at least [`MIN_FRAME_LEN`]. The first frame on a connection is
//! [`Frame::Hello`], naming the sender; every frame after it is [`Frame::Messages`].
//!
//! # What a decoder guarantees
//! - It never panics, whatever the bytes.
//! - It allocates only for bytes actually received, never for what a length field claims: a
//!   length above the configured maximum is refused as soon as its 4 bytes are in, and a
//!   postcard length prefix cannot make it preallocate more than serde's cautious cap.
//! - A frame is returned only if its length, version, checksum and cluster id are right and its
//!   payload decodes exactly (no trailing bytes). A stream that failed once cannot be trusted
//!   to be in sync again: the decoder refuses everything after its first error, and the
//!   connection should be closed.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use crate::raft::{Message, NodeId};

/// The format version written by [`encode`] and the only one a decoder accepts.
pub const VERSION: u8 = 1;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The smallest valid length field: version (1) + cluster id (8) + crc (4), empty payload.
pub const MIN_FRAME_LEN: usize = 1 + 8 + 4;

/// The default largest length field a decoder accepts (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// What one frame carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame on a connection: the sender says who it is.
    Hello {
        /// The sending node.
        from: NodeId,
    },
    /// Raft messages, in the order they should be stepped.
    Messages(Vec<Message>),
}

/// Why bytes could not be framed or a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The length field exceeds the maximum (checked before anything is buffered for it).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The length field (or, when encoding, the length the frame would need).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A format version this decoder does not speak.
    #[error("unsupported frame version {0} (expected {VERSION})")]
    BadVersion(u8),
    /// The frame belongs to another cluster.
    #[error("frame of cluster {found:#x}, expected cluster {expected:#x}")]
    WrongCluster {
        /// This side's cluster id.
        expected: u64,
        /// The frame's cluster id.
        found: u64,
    },
    /// The crc32 does not match the frame's bytes.
    #[error("frame checksum mismatch")]
    Checksum,
    /// Anything else wrong with the bytes: a length below the minimum, a payload that is not
    /// a valid [`Frame`], trailing bytes, a stream that failed earlier, a stream cut mid-frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The underlying reader or writer failed (only from [`read_frame`] / [`write_frame`]).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `frame` for cluster `cluster_id`: the whole frame, length prefix included.
///
/// Fails only if the frame would not fit the 32-bit length field ([`WireError::TooLarge`]) or
/// the payload cannot be serialized ([`WireError::Malformed`]; does not happen for the crate's
/// own message types). A receiver refuses frames above its own maximum, so senders should
/// keep batches well below it (see [`DEFAULT_MAX_FRAME`]).
///
/// ```
/// use raftkv::wire::{encode, Frame, FrameDecoder};
///
/// let bytes = encode(7, &Frame::Hello { from: 1 }).unwrap();
/// let mut decoder = FrameDecoder::new(7);
/// decoder.feed(&bytes);
/// assert_eq!(decoder.next_frame().unwrap(), Some(Frame::Hello { from: 1 }));
/// assert_eq!(decoder.next_frame().unwrap(), None);
/// ```
pub fn encode(cluster_id: u64, frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; LENGTH_PREFIX];
    out.push(VERSION);
    out.extend_from_slice(&cluster_id.to_le_bytes());
    let mut out = postcard::to_extend(frame, out)
        .map_err(|e| WireError::Malformed(format!("cannot serialize frame: {e}")))?;
    let crc = crc32fast::hash(&out[LENGTH_PREFIX..]);
    out.extend_from_slice(&crc.to_le_bytes());
    let len = out.len() - LENGTH_PREFIX;
    let len32 = u32::try_from(len).map_err(|_| WireError::TooLarge {
        len: len as u64,
        max: u64::from(u32::MAX),
    })?;
    out[..LENGTH_PREFIX].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Checks a length field against the bounds; returns it as a `usize`.
fn check_len(len: u32, max_frame: usize) -> Result<usize, WireError> {
    let len_usize = len as usize;
    if len_usize > max_frame {
        return Err(WireError::TooLarge {
            len: u64::from(len),
            max: max_frame as u64,
        });
    }
    if len_usize < MIN_FRAME_LEN {
        return Err(WireError::Malformed(format!(
            "length {len} is below the minimum of {MIN_FRAME_LEN}"
        )));
    }
    Ok(len_usize)
}

/// Decodes the bytes after the length prefix (exactly `length` of them).
fn decode_body(cluster_id: u64, body: &[u8]) -> Result<Frame, WireError> {
    debug_assert!(body.len() >= MIN_FRAME_LEN, "caller checked the length");
    let (checked, crc) = body.split_at(body.len() - 4);
    let version = checked[0];
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(checked) != crc {
        return Err(WireError::Checksum);
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&checked[1..9]);
    let found = u64::from_le_bytes(id);
    if found != cluster_id {
        return Err(WireError::WrongCluster {
            expected: cluster_id,
            found,
        });
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(&checked[9..])
        .map_err(|e| WireError::Malformed(format!("bad payload: {e}")))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the payload",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Turns a byte stream into [`Frame`]s, incrementally: [`feed`](Self::feed) bytes as they
/// arrive, then call [`next_frame`](Self::next_frame) until it returns `Ok(None)`.
///
/// Invariant: the buffer holds only bytes fed and not yet returned as frames; if the caller
/// drains frames after each `feed`, that is at most one partial frame (bounded by the maximum
/// frame size, since an oversized length is refused before its body is awaited) plus the last
/// chunk fed.
///
/// ```
/// use raftkv::wire::{encode, Frame, FrameDecoder, WireError};
///
/// let bytes = encode(1, &Frame::Messages(vec![])).unwrap();
/// let mut decoder = FrameDecoder::new(1).with_max_frame(1024);
/// let (head, tail) = bytes.split_at(5);
/// decoder.feed(head);
/// assert_eq!(decoder.next_frame().unwrap(), None); // not complete yet
/// decoder.feed(tail);
/// assert_eq!(decoder.next_frame().unwrap(), Some(Frame::Messages(vec![])));
///
/// // A frame of another cluster is refused, and so is everything after it.
/// let mut decoder = FrameDecoder::new(2);
/// decoder.feed(&bytes);
/// assert!(matches!(decoder.next_frame(), Err(WireError::WrongCluster { expected: 2, found: 1 })));
/// assert!(decoder.next_frame().is_err());
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    cluster_id: u64,
    max_frame: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset were already decoded.
    start: usize,
    /// Set by the first error: the stream is out of sync for good.
    failed: bool,
}

impl FrameDecoder {
    /// A decoder for frames of cluster `cluster_id`, accepting length fields up to
    /// [`DEFAULT_MAX_FRAME`].
    pub fn new(cluster_id: u64) -> Self {
        FrameDecoder {
            cluster_id,
            max_frame: DEFAULT_MAX_FRAME,
            buf: Vec::new(),
            start: 0,
            failed: false,
        }
    }

    /// Sets the largest length field accepted (at least [`MIN_FRAME_LEN`] makes sense).
    pub fn with_max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    /// The largest length field accepted.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes fed but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True once a decode error occurred; every later call fails.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Appends received bytes. Ignored once the decoder has failed.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that makes
    /// the stream unusable (after which every call fails).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.failed {
            return Err(WireError::Malformed(
                "the stream failed earlier and is out of sync".into(),
            ));
        }
        match self.try_next() {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = true;
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Frame>, WireError> {
        let pending = &self.buf[self.start..];
        if pending.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = u32::from_le_bytes([pending[0], pending[1], pending[2], pending[3]]);
        let len = check_len(len, self.max_frame)?;
        let Some(body) = pending.get(LENGTH_PREFIX..LENGTH_PREFIX + len) else {
            return Ok(None);
        };
        let frame = decode_body(self.cluster_id, body)?;
        self.start += LENGTH_PREFIX + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }
}

/// Writes one frame (see [`encode`]) to `writer` and flushes it.
pub async fn write_frame<W>(writer: &mut W, cluster_id: u64, frame: &Frame) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let bytes = encode(cluster_id, frame)?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame from `reader`. `Ok(None)` means the stream ended cleanly between frames;
/// a stream that ends mid-frame is [`WireError::Malformed`].
///
/// The length is checked against `max_frame` before the body is read, and the body buffer
/// grows only with bytes actually received. Not cancel-safe: if the future is dropped midway,
/// the stream is out of sync (wrap the reader in a `BufReader` for efficiency).
///
/// ```
/// use raftkv::wire::{read_frame, write_frame, Frame, DEFAULT_MAX_FRAME};
///
/// futures::executor::block_on(async {
///     let mut pipe = futures::io::Cursor::new(Vec::new());
///     write_frame(&mut pipe, 9, &Frame::Hello { from: 3 }).await.unwrap();
///     pipe.set_position(0);
///     let frame = read_frame(&mut pipe, 9, DEFAULT_MAX_FRAME).await.unwrap();
///     assert_eq!(frame, Some(Frame::Hello { from: 3 }));
///     assert_eq!(read_frame(&mut pipe, 9, DEFAULT_MAX_FRAME).await.unwrap(), None);
/// });
/// ```
pub async fn read_frame<R>(
    reader: &mut R,
    cluster_id: u64,
    max_frame: usize,
) -> Result<Option<Frame>, WireError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut got = 0;
    while got < LENGTH_PREFIX {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Malformed(format!(
                "stream ended after {got} bytes of a length prefix"
            )));
        }
        got += n;
    }
    let len = check_len(u32::from_le_bytes(prefix), max_frame)?;
    let mut body = Vec::with_capacity(len.min(64 << 10));
    (&mut *reader)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() < len {
        return Err(WireError::Malformed(format!(
            "stream ended after {} of {len} frame bytes",
            body.len()
        )));
    }
    decode_body(cluster_id, &body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryPayload, MessageBody};

    fn sample() -> Frame {
        Frame::Messages(vec![
            Message {
                from: 1,
                to: 2,
                term: 3,
                body: MessageBody::Append {
                    prev_index: 4,
                    prev_term: 2,
                    entries: vec![Entry {
                        index: 5,
                        term: 3,
                        payload: EntryPayload::Command("x=1".into()),
                    }],
                    commit: 4,
                },
            },
            Message {
                from: 1,
                to: 2,
                term: 3,
                body: MessageBody::Heartbeat {
                    commit: 5,
                    read_round: 0,
                },
            },
        ])
    }

    #[test]
    fn layout_matches_the_documented_format() {
        let bytes = encode(0x0102_0304_0506_0708, &Frame::Hello { from: 7 }).unwrap();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(bytes[4], VERSION);
        assert_eq!(&bytes[5..13], &0x0102_0304_0506_0708u64.to_le_bytes());
        let payload = &bytes[13..bytes.len() - 4];
        assert_eq!(
            payload,
            postcard::to_allocvec(&Frame::Hello { from: 7 }).unwrap()
        );
        let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&bytes[4..bytes.len() - 4]));
    }

    #[test]
    fn several_frames_in_one_feed() {
        let mut stream = encode(5, &Frame::Hello { from: 1 }).unwrap();
        stream.extend(encode(5, &sample()).unwrap());
        let mut d = FrameDecoder::new(5);
        d.feed(&stream);
        assert_eq!(d.next_frame().unwrap(), Some(Frame::Hello { from: 1 }));
        assert_eq!(d.next_frame().unwrap(), Some(sample()));
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn bad_version_is_named() {
        let mut bytes = encode(5, &sample()).unwrap();
        bytes[4] = 9;
        let mut d = FrameDecoder::new(5);
        d.feed(&bytes);
        assert!(matches!(d.next_frame(), Err(WireError::BadVersion(9))));
        assert!(d.has_failed());
    }

    #[test]
    fn length_below_minimum_is_malformed() {
        let mut d = FrameDecoder::new(5);
        d.feed(&12u32.to_le_bytes());
        assert!(matches!(d.next_frame(), Err(WireError::Malformed(_))));
    }

    #[test]
    fn trailing_payload_bytes_are_refused() {
        // A valid frame whose payload has one extra byte, with a correct checksum.
        let mut body = vec![VERSION];
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend(postcard::to_allocvec(&Frame::Hello { from: 1 }).unwrap());
        body.push(0);
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        let mut d = FrameDecoder::new(5);
        d.feed(&bytes);
        assert!(matches!(d.next_frame(), Err(WireError::Malformed(_))));
    }

    #[test]
    fn async_helpers_roundtrip_and_refuse() {
        futures::executor::block_on(async {
            let mut pipe = futures::io::Cursor::new(Vec::new());
            write_frame(&mut pipe, 3, &Frame::Hello { from: 2 })
                .await
                .unwrap();
            write_frame(&mut pipe, 3, &sample()).await.unwrap();
            let all = pipe.get_ref().clone();
            pipe.set_position(0);
            assert_eq!(
                read_frame(&mut pipe, 3, DEFAULT_MAX_FRAME).await.unwrap(),
                Some(Frame::Hello { from: 2 })
            );
            assert_eq!(
                read_frame(&mut pipe, 3, DEFAULT_MAX_FRAME).await.unwrap(),
                Some(sample())
            );
            assert_eq!(
                read_frame(&mut pipe, 3, DEFAULT_MAX_FRAME).await.unwrap(),
                None
            );

            // Cut mid-frame and mid-prefix.
            for cut in [2, all.len() - 1] {
                let mut r = futures::io::Cursor::new(all[..cut].to_vec());
                let mut results = Vec::new();
                loop {
                    match read_frame(&mut r, 3, DEFAULT_MAX_FRAME).await {
                        Ok(Some(f)) => results.push(f),
                        Ok(None) => panic!("cut at {cut} read as a clean end"),
                        Err(e) => {
                            assert!(matches!(e, WireError::Malformed(_)), "{e}");
                            break;
                        }
                    }
                }
            }

            // Oversized and wrong cluster.
            let mut r = futures::io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
            assert!(matches!(
                read_frame(&mut r, 3, 1024).await,
                Err(WireError::TooLarge { len, max: 1024 }) if len == u64::from(u32::MAX)
            ));
            let mut r = futures::io::Cursor::new(all);
            assert!(matches!(
                read_frame(&mut r, 4, DEFAULT_MAX_FRAME).await,
                Err(WireError::WrongCluster {
                    expected: 4,
                    found: 3
                })
            ));
        });
    }
}

//! The wire codec under damage: truncation, every single-bit flip, random garbage, oversized
//! lengths, frames of another cluster, and streams split at every byte boundary. Whatever the
//! bytes, the decoder returns the frame that was sent, waits for more bytes, or fails with a
//! typed error — it never panics and never returns a different frame.
//!
//! `RAFTKV_WIRE_CASES` sets the number of random garbage cases (default 4000).

use raftkv::raft::{
    AppendResponse, Entry, EntryPayload, Message, MessageBody, SnapshotMeta, SnapshotStatus,
};
use raftkv::wire::{encode, Frame, FrameDecoder, WireError, DEFAULT_MAX_FRAME, MIN_FRAME_LEN};

const CLUSTER: u64 = 0xC1A5_7E12;

/// One message of every kind.
fn every_message() -> Vec<Message> {
    let m = |body| Message {
        from: 1,
        to: 2,
        term: 7,
        body,
    };
    vec![
        m(MessageBody::Vote {
            pre_vote: true,
            last_index: 10,
            last_term: 6,
            transfer: false,
        }),
        m(MessageBody::TimeoutNow),
        m(MessageBody::VoteResponse {
            pre_vote: false,
            granted: true,
        }),
        m(MessageBody::Append {
            prev_index: 10,
            prev_term: 6,
            entries: vec![
                Entry {
                    index: 11,
                    term: 7,
                    payload: EntryPayload::Noop,
                },
                Entry {
                    index: 12,
                    term: 7,
                    payload: EntryPayload::Command(vec![0u8, 255, 1, 2].into()),
                },
            ],
            commit: 10,
        }),
        m(MessageBody::AppendResponse(AppendResponse::Accepted {
            match_index: 12,
        })),
        m(MessageBody::AppendResponse(AppendResponse::Rejected {
            rejected_index: 9,
            hint_index: 5,
            hint_term: 3,
        })),
        m(MessageBody::Heartbeat {
            commit: 12,
            read_round: 7,
        }),
        m(MessageBody::HeartbeatResponse { read_round: 7 }),
        m(MessageBody::ReadIndex { ctx: 99 }),
        m(MessageBody::ReadIndexResponse {
            ctx: 99,
            index: Some(12),
        }),
        m(MessageBody::ReadIndexResponse {
            ctx: 98,
            index: None,
        }),
        m(MessageBody::InstallSnapshot {
            meta: SnapshotMeta {
                index: 100,
                term: 5,
            },
            size: 3,
            offset: 0,
            data: b"abc".into(),
        }),
        m(MessageBody::SnapshotResponse {
            index: 100,
            next_offset: 3,
            status: SnapshotStatus::Installed,
        }),
    ]
}

fn frames() -> Vec<Frame> {
    vec![
        Frame::Hello { from: 1 },
        Frame::Messages(every_message()),
        Frame::Messages(Vec::new()),
        Frame::Hello { from: u64::MAX },
    ]
}

/// Feeds `bytes` and drains the decoder: the frames it gave, and the error it stopped on.
fn decode_all(decoder: &mut FrameDecoder, bytes: &[u8]) -> (Vec<Frame>, Option<WireError>) {
    decoder.feed(bytes);
    let mut out = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn every_frame_kind_roundtrips() {
    for frame in frames() {
        let bytes = encode(CLUSTER, &frame).unwrap();
        let (got, err) = decode_all(&mut FrameDecoder::new(CLUSTER), &bytes);
        assert!(err.is_none(), "{frame:?}: {err:?}");
        assert_eq!(got, vec![frame]);
    }
}

#[test]
fn a_truncated_frame_is_never_returned() {
    for frame in frames() {
        let bytes = encode(CLUSTER, &frame).unwrap();
        for cut in 0..bytes.len() {
            let mut decoder = FrameDecoder::new(CLUSTER);
            let (got, err) = decode_all(&mut decoder, &bytes[..cut]);
            assert!(
                got.is_empty() && err.is_none(),
                "cut at {cut}: {got:?} {err:?}"
            );
            assert_eq!(decoder.buffered(), cut);
        }
    }
}

#[test]
fn every_single_bit_flip_is_refused_or_harmless() {
    let mut refused = 0;
    let mut incomplete = 0;
    for frame in frames() {
        let bytes = encode(CLUSTER, &frame).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let mut decoder = FrameDecoder::new(CLUSTER);
            let (got, err) = decode_all(&mut decoder, &damaged);
            // The only acceptable frame is the original one (a flip can never produce it
            // here, but the property is what matters).
            for f in &got {
                assert_eq!(f, &frame, "bit {bit} produced another frame");
            }
            match err {
                Some(_) => refused += 1,
                // A flip in the length field that grows it leaves the decoder waiting.
                None if got.is_empty() => incomplete += 1,
                None => {}
            }
        }
    }
    assert!(refused > 0 && incomplete > 0, "{refused} {incomplete}");
}

#[test]
fn random_garbage_never_panics() {
    let cases: u64 = std::env::var("RAFTKV_WIRE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let (mut decoded, mut malformed) = (0, 0);
    for seed in 0..cases {
        let mut rng = SplitMix64(seed);
        let len = rng.below(300) as usize;
        let mut bytes = rng.bytes(len);
        match seed % 3 {
            // Pure garbage.
            0 => {}
            // A plausible length field in front of garbage.
            1 => {
                let claimed = (MIN_FRAME_LEN + rng.below(64) as usize) as u32;
                bytes.splice(0..0, claimed.to_le_bytes());
            }
            // A frame whose envelope is valid (length, version, cluster, crc) but whose
            // payload is garbage: exercises the payload decoder itself.
            _ => {
                // Mostly `Frame::Messages` with a small count, so message decoding runs.
                if bytes.len() >= 2 && rng.below(4) != 0 {
                    bytes[0] = 1;
                    bytes[1] = rng.below(4) as u8;
                }
                let mut body = vec![raftkv::wire::VERSION];
                body.extend_from_slice(&CLUSTER.to_le_bytes());
                body.extend_from_slice(&bytes);
                let crc = crc32fast::hash(&body);
                body.extend_from_slice(&crc.to_le_bytes());
                bytes = (body.len() as u32).to_le_bytes().to_vec();
                bytes.extend(body);
            }
        }
        let mut decoder = FrameDecoder::new(CLUSTER).with_max_frame(1 << 16);
        let result = std::panic::catch_unwind(move || decode_all(&mut decoder, &bytes));
        let Ok((got, err)) = result else {
            panic!("seed {seed} panicked");
        };
        decoded += got.len();
        if matches!(err, Some(WireError::Malformed(_))) {
            malformed += 1;
        }
    }
    // The cases reach the payload decoder, and some garbage even decodes (to some frame).
    assert!(decoded > 0 && malformed > 0, "{decoded} {malformed}");
}

#[test]
fn an_oversized_length_is_refused_before_its_body_arrives() {
    for max in [1024, DEFAULT_MAX_FRAME] {
        for len in [max as u32 + 1, u32::MAX] {
            let mut decoder = FrameDecoder::new(CLUSTER).with_max_frame(max);
            // Only the 4-byte prefix: the decoder must not wait for (or reserve) the body.
            decoder.feed(&len.to_le_bytes());
            match decoder.next_frame() {
                Err(WireError::TooLarge { len: l, max: m }) => {
                    assert_eq!((l, m), (u64::from(len), max as u64));
                }
                other => panic!("length {len} with max {max}: {other:?}"),
            }
            assert_eq!(decoder.buffered(), 0, "the buffer is dropped on error");
            decoder.feed(&[0; 100]);
            assert_eq!(
                decoder.buffered(),
                0,
                "a failed decoder takes no more bytes"
            );
        }
    }
    // The limit applies to real frames too: exactly at the limit passes, one below fails.
    let bytes = encode(CLUSTER, &Frame::Messages(every_message())).unwrap();
    let len = bytes.len() - 4;
    let (got, err) = decode_all(&mut FrameDecoder::new(CLUSTER).with_max_frame(len), &bytes);
    assert!(err.is_none() && got.len() == 1);
    let (_, err) = decode_all(
        &mut FrameDecoder::new(CLUSTER).with_max_frame(len - 1),
        &bytes,
    );
    assert!(matches!(err, Some(WireError::TooLarge { .. })));
}

#[test]
fn a_frame_of_another_cluster_is_refused() {
    let bytes = encode(CLUSTER + 1, &Frame::Hello { from: 1 }).unwrap();
    let mut decoder = FrameDecoder::new(CLUSTER);
    let (got, err) = decode_all(&mut decoder, &bytes);
    assert!(got.is_empty());
    match err {
        Some(WireError::WrongCluster { expected, found }) => {
            assert_eq!((expected, found), (CLUSTER, CLUSTER + 1));
        }
        other => panic!("{other:?}"),
    }
    // Valid frames after it are refused too: the connection is not trusted any more.
    let good = encode(CLUSTER, &Frame::Hello { from: 1 }).unwrap();
    let (got, err) = decode_all(&mut decoder, &good);
    assert!(got.is_empty() && err.is_some());
}

#[test]
fn a_stream_split_at_every_byte_boundary_decodes_the_same() {
    let sent = frames();
    let stream: Vec<u8> = sent
        .iter()
        .flat_map(|f| encode(CLUSTER, f).unwrap())
        .collect();
    for split in 0..=stream.len() {
        let mut decoder = FrameDecoder::new(CLUSTER);
        let (mut got, err) = decode_all(&mut decoder, &stream[..split]);
        assert!(err.is_none(), "split {split}: {err:?}");
        let (rest, err) = decode_all(&mut decoder, &stream[split..]);
        assert!(err.is_none(), "split {split}: {err:?}");
        got.extend(rest);
        assert_eq!(got, sent, "split at {split}");
        assert_eq!(decoder.buffered(), 0);
    }
    // And one byte at a time.
    let mut decoder = FrameDecoder::new(CLUSTER);
    let mut got = Vec::new();
    for b in &stream {
        let (frames, err) = decode_all(&mut decoder, std::slice::from_ref(b));
        assert!(err.is_none());
        got.extend(frames);
    }
    assert_eq!(got, sent);
}

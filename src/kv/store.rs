//! [`Store`]: the ordered byte map behind the KV service, in copy-on-write shards so that a
//! snapshot image costs one reference-count increment per shard.
//!
//! Invariants: a key lives in exactly one shard, chosen by a fixed hash of its bytes; an image
//! taken by [`Store::image`] never changes afterwards (a write to a shard an image still
//! shares copies that shard first, so the first write after a snapshot pays for one shard,
//! not for the whole map).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::sync::Arc;

use super::command::Bytes;

/// Number of shards. A snapshot image clones this many `Arc`s; a write after an image copies
/// one shard (1/64th of the map).
pub const SHARDS: usize = 64;

type Shard = BTreeMap<Bytes, Bytes>;

/// The ordered map.
#[derive(Clone, Debug)]
pub struct Store {
    shards: Vec<Arc<Shard>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
        }
    }
}

/// FNV-1a: fixed, so every node shards the same way.
fn shard_of(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

impl Store {
    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.shards[shard_of(key)].get(key)
    }

    fn shard_mut(&mut self, key: &[u8]) -> &mut Shard {
        Arc::make_mut(&mut self.shards[shard_of(key)])
    }

    /// Sets `key`; returns the previous value.
    pub fn put(&mut self, key: Bytes, value: Bytes) -> Option<Bytes> {
        self.shard_mut(&key).insert(key, value)
    }

    /// Appends to `key`'s value, creating it; returns the new value.
    pub fn append(&mut self, key: Bytes, suffix: &[u8]) -> &Bytes {
        let value = self.shard_mut(&key).entry(key).or_default();
        value.extend_from_slice(suffix);
        value
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        if !self.shards[shard_of(key)].contains_key(key) {
            return false; // do not copy a shared shard for nothing
        }
        self.shard_mut(key).remove(key).is_some()
    }

    /// Up to `limit` entries with keys in `start..end`, in key order.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(Bytes, Bytes)> {
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let mut out: Vec<(Bytes, Bytes)> = Vec::new();
        for shard in &self.shards {
            let range = shard.range::<[u8], _>((Bound::Included(start), upper));
            out.extend(range.take(limit).map(|(k, v)| (k.clone(), v.clone())));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        out
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// A point-in-time image, cheap to take (see the module docs).
    pub fn image(&self) -> Store {
        self.clone()
    }

    /// Writes every entry: `u32 LE key length | key | u32 LE value length | value`, shard by
    /// shard, then a `u32::MAX` end marker.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut buf = Vec::with_capacity(64 << 10);
        for shard in &self.shards {
            for (k, v) in shard.iter() {
                for part in [k, v] {
                    buf.extend_from_slice(&len_u32(part.len())?.to_le_bytes());
                    buf.extend_from_slice(part);
                }
                if buf.len() >= 64 << 10 {
                    out.write_all(&buf)?;
                    buf.clear();
                }
            }
        }
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        out.write_all(&buf)
    }

    /// Reads what [`Store::write_to`] wrote. Fails on a truncated or malformed stream.
    pub fn read_from(input: &mut dyn Read) -> io::Result<Store> {
        let mut store = Store::default();
        loop {
            let klen = read_u32(input)?;
            if klen == u32::MAX {
                return Ok(store);
            }
            let key = read_exact_vec(input, klen)?;
            let vlen = read_u32(input)?;
            let value = read_exact_vec(input, vlen)?;
            store.put(key, value);
        }
    }
}

fn len_u32(n: usize) -> io::Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&l| l != u32::MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "key or value over 4 GiB"))
}

fn read_u32(input: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    input.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads exactly `len` bytes without trusting `len` for the allocation up front.
fn read_exact_vec(input: &mut dyn Read, len: u32) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    let got = input.take(u64::from(len)).read_to_end(&mut v)?;
    if got != len as usize {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "snapshot entry cut short",
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        s.as_bytes().to_vec()
    }

    #[test]
    fn operations_scans_and_images() {
        let mut s = Store::default();
        for i in 0..200 {
            s.put(b(&format!("k{i:03}")), b("v"));
        }
        s.append(b("k005"), b"w");
        assert_eq!(s.get(b"k005"), Some(&b("vw")));
        assert!(s.delete(b"k006"));
        assert!(!s.delete(b"k006"));
        let image = s.image();
        s.put(b("k000"), b("changed"));
        assert_eq!(image.get(b"k000"), Some(&b("v")), "an image never changes");
        let scan = s.scan(b"k004", Some(b"k009"), 10);
        let keys: Vec<&[u8]> = scan.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"k004"[..], b"k005", b"k007", b"k008"]);
        assert_eq!(s.scan(b"k1", None, 3).len(), 3);
        assert_eq!(s.len(), 199);
    }

    #[test]
    fn serialization_round_trips_and_refuses_truncation() {
        let mut s = Store::default();
        for i in 0..100u32 {
            s.put(i.to_le_bytes().to_vec(), vec![i as u8; (i % 7) as usize]);
        }
        let mut bytes = Vec::new();
        s.write_to(&mut bytes).unwrap();
        let back = Store::read_from(&mut bytes.as_slice()).unwrap();
        assert_eq!(back.scan(b"", None, 1000), s.scan(b"", None, 1000));
        for cut in [0, 3, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                Store::read_from(&mut &bytes[..cut]).is_err(),
                "accepted a stream cut at {cut}"
            );
        }
        // A huge length in garbage input does not allocate it.
        let garbage = [0xFFu8, 0xFF, 0xFF, 0x7F, 1, 2, 3];
        assert!(Store::read_from(&mut garbage.as_slice()).is_err());
    }
}

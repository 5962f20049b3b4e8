//! State machines for tests: [`RecordingMachine`] keeps every command, [`DigestMachine`] keeps
//! only a running digest (small state, small snapshots).

use std::hash::{Hash, Hasher};
use std::io::{self, Read};

use crate::raft::{Index, Payload};
use crate::state_machine::{SnapshotSource, StateMachine};

/// Records `(index, command)` for every applied command; its output is the index. Its
/// snapshot holds the whole record, so a restored machine still lists every command.
#[derive(Clone, Debug, Default)]
pub struct RecordingMachine {
    commands: Vec<(Index, Payload)>,
}

impl RecordingMachine {
    /// Every applied command, in order.
    pub fn commands(&self) -> &[(Index, Payload)] {
        &self.commands
    }
}

impl StateMachine for RecordingMachine {
    type Output = Index;
    fn apply(&mut self, index: Index, command: &[u8]) -> Index {
        self.commands.push((index, Payload::from(command)));
        index
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        let record: Vec<(Index, &[u8])> = self
            .commands
            .iter()
            .map(|(i, p)| (*i, p.as_bytes()))
            .collect();
        Box::new(postcard::to_allocvec(&record).unwrap_or_default())
    }
    fn restore(&mut self, snapshot: &mut dyn Read) -> io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.read_to_end(&mut bytes)?;
        let record: Vec<(Index, Vec<u8>)> = postcard::from_bytes(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.commands = record
            .into_iter()
            .map(|(i, c)| (i, Payload::from(c)))
            .collect();
        Ok(())
    }
}

/// Keeps a count and a digest of every applied `(index, command)`: two machines agree on the
/// digest exactly when they applied the same commands at the same indexes. Its output is the
/// count, and any query answers the count; its snapshot is 24 bytes whatever the history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DigestMachine {
    /// Commands applied.
    pub count: u64,
    /// Last index applied.
    pub last_index: Index,
    /// Digest of everything applied.
    pub digest: u64,
}

impl StateMachine for DigestMachine {
    type Output = u64;
    fn apply(&mut self, index: Index, command: &[u8]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.digest, index, command).hash(&mut h);
        self.digest = h.finish();
        self.count += 1;
        self.last_index = index;
        self.count
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        let mut b = Vec::with_capacity(24);
        for v in [self.count, self.last_index, self.digest] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        Box::new(b)
    }
    fn restore(&mut self, snapshot: &mut dyn Read) -> io::Result<()> {
        let mut b = [0u8; 24];
        snapshot.read_exact(&mut b)?;
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        *self = DigestMachine {
            count: word(0),
            last_index: word(1),
            digest: word(2),
        };
        Ok(())
    }
    fn query(&self, _query: &[u8]) -> Option<u64> {
        Some(self.count)
    }
}

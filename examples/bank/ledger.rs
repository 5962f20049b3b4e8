//! A bank ledger as a raftkv [`StateMachine`]: a small example of writing your own.
//!
//! State: accounts and their balances. Commands (written to the log): open an account with an
//! initial deposit, transfer between two accounts. Queries (read-only, answered through
//! `Node::read` without a log write): one balance, or the total of all balances.
//!
//! Invariants, kept by `apply` and checked by the tests: no balance is ever negative, and a
//! transfer never changes the total (only opening an account adds money). A command that
//! would break them is refused, and the refusal is the command's output — decided from the
//! state alone, so every node refuses the same commands.

use std::collections::BTreeMap;
use std::io::{self, Read};

use raftkv::{Index, SnapshotSource, StateMachine};
use serde::{Deserialize, Serialize};

/// A command, postcard-encoded into the log with [`Command::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Opens `account` with `initial` money in it.
    Open { account: String, initial: i64 },
    /// Moves `amount` from `from` to `to`.
    Transfer {
        from: String,
        to: String,
        amount: i64,
    },
}

/// A read-only query, postcard-encoded with [`Query::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The balance of one account.
    Balance { account: String },
    /// The sum of all balances.
    Total,
}

/// What a command or query returns to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Opened,
    Transferred,
    Balance(i64),
    Total(i64),
    Refused(Refusal),
}

/// Why a command was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownAccount(String),
    AccountExists(String),
    InsufficientFunds {
        account: String,
        balance: i64,
    },
    /// Not a positive amount (or an initial deposit that would overflow the total).
    InvalidAmount(i64),
    /// Not a command or query of this ledger.
    Malformed,
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a command always serializes")
    }
}

impl Query {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a query always serializes")
    }
}

/// The ledger. Deterministic: a `BTreeMap` and plain integer arithmetic, no clock, no
/// randomness, so the same commands in the same order give the same ledger on every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    accounts: BTreeMap<String, i64>,
}

impl Ledger {
    /// The sum of all balances. Cannot overflow: `Open` refuses deposits that would.
    pub fn total(&self) -> i64 {
        self.accounts.values().sum()
    }

    fn execute(&mut self, command: Command) -> Result<Outcome, Refusal> {
        match command {
            Command::Open { account, initial } => {
                if initial < 0 || self.total().checked_add(initial).is_none() {
                    return Err(Refusal::InvalidAmount(initial));
                }
                if self.accounts.contains_key(&account) {
                    return Err(Refusal::AccountExists(account));
                }
                self.accounts.insert(account, initial);
                Ok(Outcome::Opened)
            }
            Command::Transfer { from, to, amount } => {
                if amount <= 0 {
                    return Err(Refusal::InvalidAmount(amount));
                }
                if !self.accounts.contains_key(&to) {
                    return Err(Refusal::UnknownAccount(to));
                }
                let Some(&balance) = self.accounts.get(&from) else {
                    return Err(Refusal::UnknownAccount(from));
                };
                if balance < amount {
                    return Err(Refusal::InsufficientFunds {
                        account: from,
                        balance,
                    });
                }
                // Both accounts exist and `from` can pay: no failure past this point, so the
                // transfer happens entirely or not at all. (`to` cannot overflow: every
                // balance is at most the total, which fits in an i64.)
                *self.accounts.entry(from).or_default() -= amount;
                *self.accounts.entry(to).or_default() += amount;
                debug_assert!(
                    self.accounts.values().all(|&b| b >= 0),
                    "a negative balance"
                );
                Ok(Outcome::Transferred)
            }
        }
    }
}

impl StateMachine for Ledger {
    type Output = Outcome;

    fn apply(&mut self, _index: Index, command: &[u8]) -> Outcome {
        let result = match postcard::from_bytes::<Command>(command) {
            Ok(command) => self.execute(command),
            Err(_) => Err(Refusal::Malformed),
        };
        result.unwrap_or_else(Outcome::Refused)
    }

    fn query(&self, query: &[u8]) -> Option<Outcome> {
        Some(match postcard::from_bytes::<Query>(query) {
            Ok(Query::Balance { account }) => match self.accounts.get(&account) {
                Some(&balance) => Outcome::Balance(balance),
                None => Outcome::Refused(Refusal::UnknownAccount(account)),
            },
            Ok(Query::Total) => Outcome::Total(self.total()),
            Err(_) => Outcome::Refused(Refusal::Malformed),
        })
    }

    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        // `snapshot` must return quickly, with an image that later writes cannot change. The
        // ledger is small (a few accounts), so serializing it right here is both: the bytes
        // are the image. A large state would return a cheap copy-on-write image instead and
        // serialize it in `SnapshotSource::write_to`, off the node thread (see `raftkv::kv`).
        Box::new(postcard::to_allocvec(&self.accounts).expect("a map always serializes"))
    }

    fn restore(&mut self, snapshot: &mut dyn Read) -> io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.read_to_end(&mut bytes)?;
        self.accounts = postcard::from_bytes(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(())
    }
}

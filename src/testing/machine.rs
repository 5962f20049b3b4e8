//! [`RecordingMachine`]: a state machine that records every command it applies.

use crate::raft::{Index, Payload};
use crate::state_machine::StateMachine;

/// Records `(index, command)` for every applied command; its output is the index.
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
}

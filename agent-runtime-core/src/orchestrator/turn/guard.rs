//! Guards against weak models going round in circles within one turn: invalid tool calls get a
//! bounded number of re-asks, the same call with the same arguments is not run a third time,
//! and two agents handing a turn back and forth are stopped.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Invalid tool calls in a row the model may make (each answered with the problem) before the
/// turn ends.
pub(super) const MAX_INVALID_IN_A_ROW: u32 = 3;
/// How often one exact call may run in a turn.
pub(super) const MAX_IDENTICAL_CALLS: u32 = 2;
/// How often an agent may hand the turn straight back to the one that handed it over.
pub(super) const MAX_BOUNCES: u32 = 1;

/// What the guard remembers of the turn (part of the persisted turn state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Guard {
    invalid_in_a_row: u32,
    calls: Vec<(String, u32)>,
    previous_agent: Option<String>,
    bounces: u32,
}

impl Guard {
    /// A call was refused as invalid; too many in a row is an `INVALID_TOOL` turn failure.
    pub fn invalid_call(&mut self) -> Result<()> {
        self.invalid_in_a_row += 1;
        if self.invalid_in_a_row > MAX_INVALID_IN_A_ROW {
            return Err(Error::InvalidTool(format!(
                "the model made {} invalid tool calls in a row; the turn stops",
                self.invalid_in_a_row
            )));
        }
        Ok(())
    }

    /// A valid call is about to run; the same exact call a third time is a loop.
    pub fn valid_call(&mut self, tool: &str, arguments: &Value) -> Result<()> {
        self.invalid_in_a_row = 0;
        let key = format!("{tool}\u{0}{arguments}");
        let count = match self.calls.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.calls.push((key, 1));
                1
            }
        };
        if count > MAX_IDENTICAL_CALLS {
            return Err(Error::InvalidTool(format!(
                "loop detected: the model called {tool} with the same arguments {count} times in this turn"
            )));
        }
        Ok(())
    }

    /// An automatic switch `from` → `to`; handing straight back more than once is ping-pong.
    pub fn switch(&mut self, from: &str, to: &str) -> Result<()> {
        if self.previous_agent.as_deref() == Some(to) {
            self.bounces += 1;
            if self.bounces > MAX_BOUNCES {
                return Err(Error::AgentSwitchLimit(format!(
                    "agent ping-pong: {from} and {to} keep handing the turn to each other"
                )));
            }
        }
        self.previous_agent = Some(from.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_same_call_a_third_time_is_a_loop() {
        let mut g = Guard::default();
        let args = json!({"path": "a"});
        g.valid_call("read_file", &args).unwrap();
        g.valid_call("read_file", &json!({"path": "b"})).unwrap();
        g.valid_call("read_file", &args).unwrap();
        let err = g.valid_call("read_file", &args).unwrap_err();
        assert_eq!(
            err.to_string(),
            "loop detected: the model called read_file with the same arguments 3 times in this turn"
        );
    }

    #[test]
    fn invalid_calls_get_a_bounded_number_of_re_asks() {
        let mut g = Guard::default();
        for _ in 0..MAX_INVALID_IN_A_ROW {
            g.invalid_call().unwrap();
        }
        g.valid_call("list_files", &json!({})).unwrap();
        for _ in 0..MAX_INVALID_IN_A_ROW {
            g.invalid_call().unwrap();
        }
        assert_eq!(g.invalid_call().unwrap_err().code(), "INVALID_TOOL");
    }

    #[test]
    fn handing_back_twice_is_ping_pong() {
        let mut g = Guard::default();
        g.switch("orchestrator", "coder").unwrap();
        g.switch("coder", "ask").unwrap();
        g.switch("ask", "coder").unwrap();
        let err = g.switch("coder", "ask").unwrap_err();
        assert_eq!(err.code(), "AGENT_SWITCH_LIMIT");
    }
}

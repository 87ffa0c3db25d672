//! Budgets per session (tokens, cost) and per turn (tokens, cost, wall time, tool calls), the price
//! table that turns a call's usage into cost, and the one check the turn engine asks before a step.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::session::Usage;

/// Limits of a session and of each of its turns; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Tokens (prompt + completion) of every turn of the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_tokens: Option<u64>,
    /// Cost of every turn of the session, in the price table's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_cost: Option<f64>,
    /// Tokens of one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tokens: Option<u64>,
    /// Cost of one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_cost: Option<f64>,
    /// Wall time of one turn while it runs (paused time does not count), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_time_secs: Option<u64>,
    /// Tool calls of one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tool_calls: Option<u64>,
}

/// Which budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// [`Budget::session_tokens`].
    SessionTokens,
    /// [`Budget::session_cost`].
    SessionCost,
    /// [`Budget::turn_tokens`].
    TurnTokens,
    /// [`Budget::turn_cost`].
    TurnCost,
    /// [`Budget::turn_time_secs`].
    TurnTimeSecs,
    /// [`Budget::turn_tool_calls`].
    TurnToolCalls,
}

impl BudgetKind {
    /// Every kind, in the order they are checked.
    pub const ALL: [BudgetKind; 6] = [
        BudgetKind::TurnToolCalls,
        BudgetKind::TurnTimeSecs,
        BudgetKind::TurnTokens,
        BudgetKind::TurnCost,
        BudgetKind::SessionTokens,
        BudgetKind::SessionCost,
    ];

    /// The wire name (`turn_tool_calls`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::SessionTokens => "session_tokens",
            BudgetKind::SessionCost => "session_cost",
            BudgetKind::TurnTokens => "turn_tokens",
            BudgetKind::TurnCost => "turn_cost",
            BudgetKind::TurnTimeSecs => "turn_time_secs",
            BudgetKind::TurnToolCalls => "turn_tool_calls",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        BudgetKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether amounts of this budget are whole numbers (everything but cost).
    pub fn whole(self) -> bool {
        !matches!(self, BudgetKind::SessionCost | BudgetKind::TurnCost)
    }

    /// Whether the session (not the turn) holds this budget.
    pub fn of_session(self) -> bool {
        matches!(self, BudgetKind::SessionTokens | BudgetKind::SessionCost)
    }

    /// An amount of this budget as JSON: an integer for whole budgets, money to 1e-9.
    pub fn amount(self, v: f64) -> Value {
        if self.whole() {
            json!(v.max(0.0).round() as u64)
        } else {
            json!(money(v))
        }
    }
}

impl Budget {
    /// The limit of `kind`, as a number.
    pub fn limit(&self, kind: BudgetKind) -> Option<f64> {
        match kind {
            BudgetKind::SessionTokens => self.session_tokens.map(|v| v as f64),
            BudgetKind::SessionCost => self.session_cost,
            BudgetKind::TurnTokens => self.turn_tokens.map(|v| v as f64),
            BudgetKind::TurnCost => self.turn_cost,
            BudgetKind::TurnTimeSecs => self.turn_time_secs.map(|v| v as f64),
            BudgetKind::TurnToolCalls => self.turn_tool_calls.map(|v| v as f64),
        }
    }

    /// Sets the limit of `kind` (whole budgets round up).
    pub fn set(&mut self, kind: BudgetKind, limit: f64) {
        let whole = limit.max(0.0).ceil() as u64;
        match kind {
            BudgetKind::SessionTokens => self.session_tokens = Some(whole),
            BudgetKind::SessionCost => self.session_cost = Some(limit),
            BudgetKind::TurnTokens => self.turn_tokens = Some(whole),
            BudgetKind::TurnCost => self.turn_cost = Some(limit),
            BudgetKind::TurnTimeSecs => self.turn_time_secs = Some(whole),
            BudgetKind::TurnToolCalls => self.turn_tool_calls = Some(whole),
        }
    }

    /// `self` with every limit `later` sets replacing its own.
    pub fn overlaid(mut self, later: &Budget) -> Budget {
        for k in BudgetKind::ALL {
            if let Some(v) = later.limit(k) {
                self.set(k, v);
            }
        }
        self
    }

    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        BudgetKind::ALL.iter().all(|k| self.limit(*k).is_none())
    }

    /// Reads a `budget` object of a request body: known keys only, each a number ≥ 0 (a whole
    /// number for tokens, seconds and tool calls) or `null` for unlimited. Returns the limits it
    /// sets and the keys it clears. `INVALID_REQUEST` naming the key otherwise.
    pub fn parse_patch(v: &Value) -> Result<(Budget, Vec<BudgetKind>)> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::InvalidRequest("budget must be a JSON object".into()))?;
        let mut set = Budget::default();
        let mut cleared = Vec::new();
        for (key, value) in obj {
            let kind = BudgetKind::parse(key).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "budget.{key} is not a budget (known: {})",
                    BudgetKind::ALL.map(BudgetKind::as_str).join(", ")
                ))
            })?;
            if value.is_null() {
                cleared.push(kind);
                continue;
            }
            let ok = if kind.whole() {
                value.as_u64().map(|n| n as f64)
            } else {
                value.as_f64().filter(|f| f.is_finite() && *f >= 0.0)
            };
            let n = ok.ok_or_else(|| {
                let what = if kind.whole() {
                    "a whole number ≥ 0"
                } else {
                    "a number ≥ 0"
                };
                Error::InvalidRequest(format!("budget.{key} must be {what} or null, not {value}"))
            })?;
            set.set(kind, n);
        }
        Ok((set, cleared))
    }

    /// `self` changed by a parsed patch.
    pub fn patched(mut self, set: &Budget, cleared: &[BudgetKind]) -> Budget {
        for k in cleared {
            self.clear(*k);
        }
        self.overlaid(set)
    }

    fn clear(&mut self, kind: BudgetKind) {
        match kind {
            BudgetKind::SessionTokens => self.session_tokens = None,
            BudgetKind::SessionCost => self.session_cost = None,
            BudgetKind::TurnTokens => self.turn_tokens = None,
            BudgetKind::TurnCost => self.turn_cost = None,
            BudgetKind::TurnTimeSecs => self.turn_time_secs = None,
            BudgetKind::TurnToolCalls => self.turn_tool_calls = None,
        }
    }
}

/// What a session and its current turn have spent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    /// Tokens of the whole session.
    pub session_tokens: u64,
    /// Cost of the whole session (`None`: the model has no price).
    pub session_cost: Option<f64>,
    /// Tokens of this turn.
    pub turn_tokens: u64,
    /// Cost of this turn (`None`: the model has no price).
    pub turn_cost: Option<f64>,
    /// Seconds this turn has run.
    pub turn_time_secs: f64,
    /// Tool calls of this turn.
    pub turn_tool_calls: u64,
}

impl Spent {
    /// The amount spent of `kind` (`None`: unknown, a cost without prices).
    pub fn of(&self, kind: BudgetKind) -> Option<f64> {
        match kind {
            BudgetKind::SessionTokens => Some(self.session_tokens as f64),
            BudgetKind::SessionCost => self.session_cost,
            BudgetKind::TurnTokens => Some(self.turn_tokens as f64),
            BudgetKind::TurnCost => self.turn_cost,
            BudgetKind::TurnTimeSecs => Some(self.turn_time_secs),
            BudgetKind::TurnToolCalls => Some(self.turn_tool_calls as f64),
        }
    }

    /// What was spent of every budget and what remains of those `limits` sets, as `done.usage`
    /// and `GET /sessions/{id}/usage` show them (a cost without prices is left out).
    pub fn report(&self, limits: &Budget) -> BudgetReport {
        let mut spent = Budget::default();
        let mut remaining = Budget::default();
        for k in BudgetKind::ALL {
            let Some(s) = self.of(k) else { continue };
            // Whole budgets show whole amounts spent (time: seconds begun are not yet spent).
            spent.set(k, if k.whole() { s.floor() } else { money(s) });
            if let Some(limit) = limits.limit(k) {
                let left = (limit - s).max(0.0);
                remaining.set(k, if k.whole() { left.floor() } else { money(left) });
            }
        }
        BudgetReport { spent, remaining }
    }
}

/// Money rounded to 1e-9, so sums of prices read as written (0.04 + 0.04 is 0.08, not
/// 0.08000000000000002).
pub fn money(v: f64) -> f64 {
    (v * 1e9).round() / 1e9
}

/// Spent and remaining amounts, by budget (the wire names of [`Budget`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BudgetReport {
    /// What was spent.
    pub spent: Budget,
    /// What remains of each limited budget.
    pub remaining: Budget,
}

/// A session's usage as `GET /sessions/{id}/usage` shows it: tokens, cost, its budgets, and what
/// was spent and remains of each (turn budgets: of the paused turn, or 0 between turns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BudgetUsage {
    /// The session.
    pub session_id: String,
    /// Tokens sent to the model by every turn.
    pub prompt_tokens: u64,
    /// Of those, served from the model server's cache.
    pub cached_prompt_tokens: u64,
    /// Tokens the model produced.
    pub completion_tokens: u64,
    /// Prompt and completion tokens.
    pub total_tokens: u64,
    /// What the session's model calls cost; `null` when the model has no price.
    pub cost: Option<f64>,
    /// Why `cost` is `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_unavailable: Option<String>,
    /// The limits in force.
    pub budget: Budget,
    /// What was spent.
    pub spent: Budget,
    /// What remains of each limited budget.
    pub remaining: Budget,
}

/// What comes next in the turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// A model call whose prompt has this many tokens and costs this much (if priced).
    ModelCall {
        /// The window's prompt tokens.
        prompt_tokens: u64,
        /// What the prompt will cost, if the model has a price.
        prompt_cost: Option<f64>,
    },
    /// A tool call.
    ToolCall,
    /// Between steps (only wall time is checked).
    Between,
}

/// The answer of [`check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Go on; a model call gets at most `max_tokens` completion tokens (`None`: no token budget).
    Within {
        /// The completion tokens that remain under every token budget.
        max_tokens: Option<u64>,
    },
    /// This budget would be exceeded.
    Exceeded {
        /// Which.
        budget: BudgetKind,
        /// What was spent.
        spent: f64,
        /// The limit.
        limit: f64,
    },
}

/// Whether `step` fits in `limits` given `spent`. A tool call fits while fewer tool calls than the
/// limit were made; a model call while its prompt leaves at least one completion token under every
/// token budget and its prompt's cost stays under every cost budget; any step while the turn has
/// run less than its time budget.
pub fn check(limits: &Budget, spent: &Spent, step: Step) -> Decision {
    let exceeded = |budget: BudgetKind, spent: f64, limit: f64| Decision::Exceeded { budget, spent, limit };
    if let Some(limit) = limits.limit(BudgetKind::TurnTimeSecs)
        && spent.turn_time_secs >= limit
    {
        return exceeded(BudgetKind::TurnTimeSecs, spent.turn_time_secs, limit);
    }
    match step {
        Step::Between => Decision::Within { max_tokens: None },
        Step::ToolCall => match limits.limit(BudgetKind::TurnToolCalls) {
            Some(limit) if spent.turn_tool_calls as f64 >= limit => {
                exceeded(BudgetKind::TurnToolCalls, spent.turn_tool_calls as f64, limit)
            }
            _ => Decision::Within { max_tokens: None },
        },
        Step::ModelCall {
            prompt_tokens,
            prompt_cost,
        } => {
            let mut max_tokens: Option<u64> = None;
            for kind in [BudgetKind::TurnTokens, BudgetKind::SessionTokens] {
                let (Some(limit), Some(s)) = (limits.limit(kind), spent.of(kind)) else {
                    continue;
                };
                if s + prompt_tokens as f64 >= limit {
                    return exceeded(kind, s, limit);
                }
                let left = ((limit - s) as u64).saturating_sub(prompt_tokens);
                max_tokens = Some(max_tokens.map_or(left, |m| m.min(left)));
            }
            for kind in [BudgetKind::TurnCost, BudgetKind::SessionCost] {
                let (Some(limit), Some(s)) = (limits.limit(kind), spent.of(kind)) else {
                    continue;
                };
                if s + prompt_cost.unwrap_or(0.0) >= limit {
                    return exceeded(kind, s, limit);
                }
            }
            Decision::Within { max_tokens }
        }
    }
}

/// The limit an `approve` of a budget approval sets: twice the old one (at least one more).
pub fn proposed_limit(kind: BudgetKind, limit: f64) -> f64 {
    if kind.whole() {
        (limit * 2.0).max(limit + 1.0)
    } else if limit > 0.0 {
        limit * 2.0
    } else {
        0.01
    }
}

/// A model's prices per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens not served from the cache.
    pub input: f64,
    /// Prompt tokens served from the cache (default: `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Completion tokens.
    pub output: f64,
}

impl Price {
    /// What `usage` costs at these prices.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + usage.completion_tokens as f64 * self.output)
            / 1_000_000.0
    }
}

/// `MODEL_PRICES_FILE`: prices by model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
}

impl PriceTable {
    /// Reads the JSON object `{"<model>": {"input": .., "cached_input": .., "output": ..}}` (dollars,
    /// or any one currency, per million tokens). Errors name the file, the model and the fix.
    pub fn load(path: &Path) -> Result<PriceTable> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidRequest(format!(
                "MODEL_PRICES_FILE: cannot read '{}': {e}",
                path.display()
            ))
        })?;
        PriceTable::parse(&text)
            .map_err(|m| Error::InvalidRequest(format!("MODEL_PRICES_FILE: '{}': {m}", path.display())))
    }

    /// Parses the file's text; `Err` says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<PriceTable, String> {
        let prices: BTreeMap<String, Price> = serde_json::from_str(text).map_err(|e| {
            format!(
                "{e}; expected {{\"<model>\": {{\"input\": 0.15, \"cached_input\": 0.075, \"output\": 0.6}}}} (per million tokens)"
            )
        })?;
        for (model, p) in &prices {
            let all = [Some(p.input), p.cached_input, Some(p.output)];
            if all.into_iter().flatten().any(|v| !v.is_finite() || v < 0.0) {
                return Err(format!("the prices of '{model}' must be numbers ≥ 0"));
            }
        }
        Ok(PriceTable { prices })
    }

    /// The price of `model`, if the table has it.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.prices.get(model)
    }

    /// What `usage` of `model` costs; `None` when the table has no price for it.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        self.get(model).map(|p| p.cost(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spent(turn_tokens: u64, turn_tool_calls: u64) -> Spent {
        Spent {
            session_tokens: turn_tokens,
            turn_tokens,
            turn_tool_calls,
            ..Spent::default()
        }
    }

    #[test]
    fn a_tool_call_budget_lets_exactly_its_limit_through() {
        let limits = Budget {
            turn_tool_calls: Some(2),
            ..Budget::default()
        };
        let decisions: Vec<Decision> = (0..=2)
            .map(|n| check(&limits, &spent(0, n), Step::ToolCall))
            .collect();
        assert_eq!(
            decisions,
            [
                Decision::Within { max_tokens: None },
                Decision::Within { max_tokens: None },
                Decision::Exceeded {
                    budget: BudgetKind::TurnToolCalls,
                    spent: 2.0,
                    limit: 2.0
                }
            ]
        );
    }

    #[test]
    fn a_model_call_is_capped_to_the_tokens_left_and_refused_without_room_for_one() {
        let limits = Budget {
            turn_tokens: Some(300),
            session_tokens: Some(1000),
            ..Budget::default()
        };
        let call = |prompt_tokens| Step::ModelCall {
            prompt_tokens,
            prompt_cost: None,
        };
        assert_eq!(
            check(&limits, &spent(150, 0), call(100)),
            Decision::Within { max_tokens: Some(50) }
        );
        assert_eq!(
            check(&limits, &spent(150, 0), call(150)),
            Decision::Exceeded {
                budget: BudgetKind::TurnTokens,
                spent: 150.0,
                limit: 300.0
            }
        );
    }

    #[test]
    fn costs_come_from_the_price_table_with_cached_input_priced_apart() {
        let table =
            PriceTable::parse(r#"{"m": {"input": 2.5, "cached_input": 1.25, "output": 10}}"#).unwrap();
        let usage = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 100_000,
            cached_prompt_tokens: 400_000,
        };
        assert_eq!(table.cost("m", &usage), Some(0.6 * 2.5 + 0.4 * 1.25 + 1.0));
        assert_eq!(table.cost("unknown", &usage), None);
        assert!(PriceTable::parse(r#"{"m": {"input": -1, "output": 1}}"#).is_err());
        assert!(PriceTable::parse(r#"{"m": {"input": 1}}"#).is_err());
    }

    #[test]
    fn a_budget_patch_names_the_bad_key() {
        let (set, cleared) =
            Budget::parse_patch(&json!({"turn_tool_calls": 3, "session_cost": 1.5, "turn_tokens": null}))
                .unwrap();
        assert_eq!(
            (set, cleared),
            (
                Budget {
                    turn_tool_calls: Some(3),
                    session_cost: Some(1.5),
                    ..Budget::default()
                },
                vec![BudgetKind::TurnTokens]
            )
        );
        for (bad, says) in [
            (json!({"turns": 1}), "budget.turns is not a budget"),
            (json!({"turn_tool_calls": -1}), "budget.turn_tool_calls must be"),
            (json!({"turn_tokens": 1.5}), "budget.turn_tokens must be"),
            (json!([1]), "budget must be a JSON object"),
        ] {
            let e = Budget::parse_patch(&bad).unwrap_err();
            assert!(e.to_string().starts_with(says), "{e}");
        }
    }
}

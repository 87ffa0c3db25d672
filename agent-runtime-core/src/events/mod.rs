//! The in-process EventBus: typed notifications (`approval.requested`, `turn.completed`, ...) for
//! embedders. Publishing never waits: a slow subscriber lags and is told how many events it missed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::time::Timestamp;

/// The kinds of bus events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BusEventKind {
    /// A tool or plan approval was requested.
    #[serde(rename = "approval.requested")]
    ApprovalRequested,
    /// An approval was approved (as proposed or edited).
    #[serde(rename = "approval.approved")]
    ApprovalApproved,
    /// An approval was rejected.
    #[serde(rename = "approval.rejected")]
    ApprovalRejected,
    /// An approval was cancelled.
    #[serde(rename = "approval.cancelled")]
    ApprovalCancelled,
    /// A session was created.
    #[serde(rename = "session.created")]
    SessionCreated,
    /// A session was deleted.
    #[serde(rename = "session.deleted")]
    SessionDeleted,
    /// A session's agent changed.
    #[serde(rename = "agent.switched")]
    AgentSwitched,
    /// The runtime executed a tool.
    #[serde(rename = "tool.executed")]
    ToolExecuted,
    /// A turn started (or resumed).
    #[serde(rename = "turn.started")]
    TurnStarted,
    /// A turn ended or paused without error.
    #[serde(rename = "turn.completed")]
    TurnCompleted,
    /// A turn failed.
    #[serde(rename = "turn.failed")]
    TurnFailed,
    /// A turn reached a budget and paused on a `budget` approval.
    #[serde(rename = "budget.exceeded")]
    BudgetExceeded,
    /// A budget approval raised a budget (approved or edited).
    #[serde(rename = "budget.raised")]
    BudgetRaised,
}

impl BusEventKind {
    /// Every kind.
    pub const ALL: [BusEventKind; 13] = [
        BusEventKind::ApprovalRequested,
        BusEventKind::ApprovalApproved,
        BusEventKind::ApprovalRejected,
        BusEventKind::ApprovalCancelled,
        BusEventKind::SessionCreated,
        BusEventKind::SessionDeleted,
        BusEventKind::AgentSwitched,
        BusEventKind::ToolExecuted,
        BusEventKind::TurnStarted,
        BusEventKind::TurnCompleted,
        BusEventKind::TurnFailed,
        BusEventKind::BudgetExceeded,
        BusEventKind::BudgetRaised,
    ];

    /// The dotted name, e.g. `approval.requested`.
    pub fn as_str(self) -> &'static str {
        match self {
            BusEventKind::ApprovalRequested => "approval.requested",
            BusEventKind::ApprovalApproved => "approval.approved",
            BusEventKind::ApprovalRejected => "approval.rejected",
            BusEventKind::ApprovalCancelled => "approval.cancelled",
            BusEventKind::SessionCreated => "session.created",
            BusEventKind::SessionDeleted => "session.deleted",
            BusEventKind::AgentSwitched => "agent.switched",
            BusEventKind::ToolExecuted => "tool.executed",
            BusEventKind::TurnStarted => "turn.started",
            BusEventKind::TurnCompleted => "turn.completed",
            BusEventKind::TurnFailed => "turn.failed",
            BusEventKind::BudgetExceeded => "budget.exceeded",
            BusEventKind::BudgetRaised => "budget.raised",
        }
    }

    /// Parses a dotted name.
    pub fn parse(s: &str) -> Option<Self> {
        BusEventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One notification on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusEvent {
    /// What happened.
    pub kind: BusEventKind,
    /// The session it happened in.
    pub session_id: String,
    /// When.
    pub at: Timestamp,
    /// Details (call id, tool, agents, stop reason, ...).
    pub data: Value,
}

/// Which bus events a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusFilter {
    /// Only these kinds (`None`: all).
    pub kinds: Option<Vec<BusEventKind>>,
    /// Only this session (`None`: all).
    pub session_id: Option<String>,
}

impl BusFilter {
    fn matches(&self, e: &BusEvent) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
            && self.session_id.as_ref().is_none_or(|s| *s == e.session_id)
    }
}

/// What a subscriber gets instead of an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The subscriber fell behind; this many events were dropped for it.
    #[error("subscriber lagged: {0} events missed")]
    Lagged(u64),
    /// The bus is gone.
    #[error("event bus closed")]
    Closed,
}

/// Publishes [`BusEvent`]s to every subscriber. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<BusEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(1024)
    }
}

impl EventBus {
    /// A bus where each subscriber may fall `capacity` events behind before it lags.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// Publishes without waiting (no subscribers is fine).
    pub fn publish(&self, kind: BusEventKind, session_id: &str, data: Value) {
        let _ = self.tx.send(BusEvent {
            kind,
            session_id: session_id.to_string(),
            at: Timestamp::now(),
            data,
        });
    }

    /// Subscribes to future events that match `filter`.
    pub fn subscribe(&self, filter: BusFilter) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            filter,
        }
    }
}

/// A subscriber's end of the bus.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<BusEvent>,
    filter: BusFilter,
}

impl Subscription {
    /// The next matching event; `Lagged(n)` once after events were missed, then the next ones.
    pub async fn recv(&mut self) -> Result<BusEvent, BusError> {
        loop {
            match self.rx.recv().await {
                Ok(e) if self.filter.matches(&e) => return Ok(e),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(BusError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(BusError::Closed),
            }
        }
    }

    /// The next matching event if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Result<BusEvent, BusError>> {
        loop {
            match self.rx.try_recv() {
                Ok(e) if self.filter.matches(&e) => return Some(Ok(e)),
                Ok(_) => continue,
                Err(broadcast::error::TryRecvError::Lagged(n)) => return Some(Err(BusError::Lagged(n))),
                Err(broadcast::error::TryRecvError::Closed) => return Some(Err(BusError::Closed)),
                Err(broadcast::error::TryRecvError::Empty) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn filters_by_kind_and_session() {
        let bus = EventBus::default();
        let mut sub = bus.subscribe(BusFilter {
            kinds: Some(vec![BusEventKind::ApprovalRequested]),
            session_id: Some("s1".into()),
        });
        bus.publish(BusEventKind::TurnStarted, "s1", json!({}));
        bus.publish(BusEventKind::ApprovalRequested, "s2", json!({}));
        bus.publish(BusEventKind::ApprovalRequested, "s1", json!({"call_id": "c1"}));
        let e = sub.recv().await.unwrap();
        assert_eq!(
            (e.kind, e.session_id.as_str(), e.data),
            (BusEventKind::ApprovalRequested, "s1", json!({"call_id": "c1"}))
        );
        assert!(sub.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_and_is_told_how_many_it_missed() {
        let bus = EventBus::new(4);
        let mut slow = bus.subscribe(BusFilter::default());
        for i in 0..10 {
            bus.publish(BusEventKind::ToolExecuted, "s", json!({"i": i}));
        }
        assert_eq!(slow.recv().await, Err(BusError::Lagged(6)));
        assert_eq!(slow.recv().await.unwrap().data, json!({"i": 6}));
    }

    #[test]
    fn kinds_have_dotted_names() {
        for k in BusEventKind::ALL {
            assert_eq!(BusEventKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
    }
}

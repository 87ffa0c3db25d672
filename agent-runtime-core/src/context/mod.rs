//! The context window (API.md §5.6): which stored messages go to the model, counted with a real
//! tokenizer, never splitting an assistant's tool calls from their results.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::session::{Message, Role};

/// Counts tokens the way the model does. The default is `o200k_base`, embedded (no network).
pub trait Tokenizer: Send + Sync + std::fmt::Debug {
    /// The number of tokens of `text`.
    fn count(&self, text: &str) -> usize;
}

/// The `o200k_base` tokenizer (GPT-4o family), loaded once per process.
#[derive(Debug, Clone, Copy, Default)]
pub struct O200kTokenizer;

impl Tokenizer for O200kTokenizer {
    fn count(&self, text: &str) -> usize {
        tiktoken_rs::o200k_base_singleton().encode_ordinary(text).len()
    }
}

/// The default tokenizer as a shared handle (with a cache: the window is rebuilt on every
/// model call from mostly the same messages).
pub fn default_tokenizer() -> Arc<dyn Tokenizer> {
    Arc::new(CachedTokenizer::new(Arc::new(O200kTokenizer)))
}

/// Remembers the counts of texts seen recently, so a window rebuilt for every model call
/// tokenizes only what is new.
///
/// Bounded by bytes: [`CACHE_SLOTS`] slots of 8 bytes (512 KiB), allocated once. A text's
/// 64-bit hash picks its slot (low bits) and is checked against the slot's tag (high bits); a
/// new text takes its slot over. Lock-free: one atomic load for a hit, one store after a miss.
pub struct CachedTokenizer {
    inner: Arc<dyn Tokenizer>,
    /// Seeded per process: which texts share a slot cannot be chosen from outside.
    hasher: foldhash::quality::RandomState,
    /// Each a tag (the hash's high 40 bits) and the count plus one (low 24 bits); 0 is empty.
    slots: Box<[std::sync::atomic::AtomicU64]>,
}

/// The cache's slots: 65,536 × 8 bytes = 512 KiB.
pub const CACHE_SLOTS: usize = 1 << 16;
/// The low bits of a slot that hold the count plus one; larger counts are not cached.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl std::fmt::Debug for CachedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTokenizer")
            .field("inner", &self.inner)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl CachedTokenizer {
    /// Caches the counts of `inner`.
    pub fn new(inner: Arc<dyn Tokenizer>) -> Self {
        CachedTokenizer {
            inner,
            hasher: foldhash::quality::RandomState::default(),
            slots: (0..CACHE_SLOTS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }
}

impl Tokenizer for CachedTokenizer {
    fn count(&self, text: &str) -> usize {
        use std::hash::BuildHasher;
        use std::sync::atomic::Ordering::Relaxed;
        // Short texts are cached too: tokenizing even a few words (the regex split, the pieces'
        // lookups) costs several thousand instructions, hashing them some tens.
        if text.is_empty() {
            return self.inner.count(text);
        }
        let hash = self.hasher.hash_one(text);
        let slot = &self.slots[hash as usize % CACHE_SLOTS];
        let tag = hash & !COUNT_MASK;
        let held = slot.load(Relaxed);
        if held & !COUNT_MASK == tag && held & COUNT_MASK != 0 {
            return (held & COUNT_MASK) as usize - 1;
        }
        let n = self.inner.count(text);
        if (n as u64) < COUNT_MASK {
            slot.store(tag | (n as u64 + 1), Relaxed);
        }
        n
    }
}

/// Tokens a chat format spends per message beyond its content (role, separators).
const MESSAGE_OVERHEAD: usize = 4;

/// The limits of what is sent to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    /// At most this many stored messages (the system prompt not counted).
    pub max_messages: usize,
    /// At most this many tokens, the system prompt included.
    pub max_tokens: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits {
            max_messages: 50,
            max_tokens: 8000,
        }
    }
}

/// The messages chosen for one model call.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The chosen messages, oldest first.
    pub messages: Vec<Message>,
    /// Tokens of the system prompt plus the chosen messages.
    pub tokens: usize,
    /// How many of the offered messages were left out.
    pub dropped: usize,
}

/// Tokens one message costs in the window.
pub fn message_tokens(tokenizer: &dyn Tokenizer, m: &Message) -> usize {
    let calls: usize = m
        .tool_calls
        .iter()
        .map(|c| tokenizer.count(&c.name) + tokenizer.count(&c.arguments.to_string()) + MESSAGE_OVERHEAD)
        .sum();
    tokenizer.count(&m.content) + calls + MESSAGE_OVERHEAD
}

/// Picks the newest messages of `recent` (oldest first, as storage returns the newest N) that fit
/// both limits next to `system_prompt`.
///
/// Messages are taken in groups: an assistant message with tool calls together with the tool
/// results that follow it, so the model never sees a call without its results or a result without
/// its call. A leading group that starts with orphan tool results (its assistant message fell
/// outside `recent`) is never included. `CONTEXT_TOO_LARGE` when even the newest group does not fit.
pub fn build_window(
    tokenizer: &dyn Tokenizer,
    limits: ContextLimits,
    system_prompt: &str,
    recent: &[Message],
) -> Result<Window> {
    let system = tokenizer.count(system_prompt) + MESSAGE_OVERHEAD;
    let groups = group_boundaries(recent);
    let mut start = recent.len();
    let mut tokens = system;
    // The newest group with its tool results cut to fit, when they alone overflow the window.
    let mut newest_cut: Option<Vec<Message>> = None;
    for (i, &(g_start, g_end)) in groups.iter().enumerate().rev() {
        let group = &recent[g_start..g_end];
        let newest = i + 1 == groups.len();
        if group[0].role == Role::Tool {
            // Orphan results: their call is older than what was loaded; never sent alone.
            if newest {
                return Err(Error::Internal(
                    "the newest messages are tool results without their call".into(),
                ));
            }
            break;
        }
        let mut cost: usize = group.iter().map(|m| message_tokens(tokenizer, m)).sum();
        let count = recent.len() - g_start;
        if newest
            && tokens + cost > limits.max_tokens
            && count <= limits.max_messages
            && let Some(cut) = cut_tool_results(tokenizer, group, limits.max_tokens.saturating_sub(tokens))
        {
            cost = cut.iter().map(|m| message_tokens(tokenizer, m)).sum();
            newest_cut = Some(cut);
        }
        if tokens + cost > limits.max_tokens || count > limits.max_messages {
            if newest {
                return Err(Error::ContextTooLarge(format!(
                    "the system prompt and the newest message need {} tokens and {} messages; the window allows {} tokens and {} messages",
                    tokens + cost,
                    group.len(),
                    limits.max_tokens,
                    limits.max_messages
                )));
            }
            break;
        }
        tokens += cost;
        start = g_start;
    }
    let mut messages = recent[start..].to_vec();
    if let Some(cut) = newest_cut {
        messages.truncate(messages.len() - cut.len());
        messages.extend(cut);
    }
    Ok(Window {
        messages,
        tokens,
        dropped: start,
    })
}

/// The group with its tool results cut (each to an equal share of what is left of `budget`
/// after the other messages), or `None` if there are none or even that cannot fit.
fn cut_tool_results(tokenizer: &dyn Tokenizer, group: &[Message], budget: usize) -> Option<Vec<Message>> {
    let tools = group.iter().filter(|m| m.role == Role::Tool).count();
    if tools == 0 {
        return None;
    }
    let fixed: usize = group
        .iter()
        .filter(|m| m.role != Role::Tool)
        .map(|m| message_tokens(tokenizer, m))
        .sum();
    // Room for each result's content, keeping a little for the note a cut adds.
    let share = budget.checked_sub(fixed)? / tools;
    let share = share.checked_sub(MESSAGE_OVERHEAD + 24)?;
    let mut out = group.to_vec();
    for m in out.iter_mut().filter(|m| m.role == Role::Tool) {
        let mut bytes = m.content.len();
        while tokenizer.count(&m.content) > share && bytes > 0 {
            // Tokens shrink about in proportion to bytes; aim a little under.
            let ratio = share as f64 / tokenizer.count(&m.content).max(1) as f64;
            bytes = ((bytes as f64) * ratio * 0.9) as usize;
            m.content = truncate_output(&m.content, bytes);
        }
    }
    let total: usize = out.iter().map(|m| message_tokens(tokenizer, m)).sum();
    (total <= budget).then_some(out)
}

/// Splits `messages` into groups `[start, end)`: a tool-calling assistant message with the tool
/// results after it, or a single other message. Tool results before any call form their own group.
fn group_boundaries(messages: &[Message]) -> Vec<(usize, usize)> {
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let joins_previous = m.role == Role::Tool && i > 0 && {
            let prev = &messages[i - 1];
            prev.role == Role::Tool || (prev.role == Role::Assistant && !prev.tool_calls.is_empty())
        };
        match groups.last_mut() {
            Some(last) if joins_previous => last.1 = i + 1,
            _ => groups.push((i, i + 1)),
        }
    }
    groups
}

/// Cuts a tool's output to `max_bytes` (on a character boundary) with a note of how much was cut.
pub fn truncate_output(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[output truncated: {} of {} bytes cut]",
        &text[..end],
        text.len() - end,
        text.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ToolCall;
    use crate::time::Timestamp;

    fn msg(seq: u64, role: Role, content: &str) -> Message {
        Message {
            seq,
            role,
            content: content.into(),
            agent: None,
            tool_calls: vec![],
            tool_call_id: None,
            created_at: Timestamp::from_millis(0),
        }
    }

    fn call(seq: u64, ids: &[&str]) -> Message {
        let mut m = msg(seq, Role::Assistant, "");
        m.tool_calls = ids
            .iter()
            .map(|id| ToolCall {
                id: id.to_string(),
                name: "read_file".into(),
                arguments: serde_json::json!({"path": "a"}),
            })
            .collect();
        m
    }

    fn result(seq: u64, id: &str, content: &str) -> Message {
        let mut m = msg(seq, Role::Tool, content);
        m.tool_call_id = Some(id.into());
        m
    }

    fn seqs(w: &Window) -> Vec<u64> {
        w.messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn the_cache_gives_the_same_counts() {
        let cached = CachedTokenizer::new(Arc::new(O200kTokenizer));
        let text = "a longer text that is worth caching, with some words in it, and more".repeat(3);
        assert_eq!(cached.count(&text), O200kTokenizer.count(&text));
        assert_eq!(cached.count(&text), O200kTokenizer.count(&text));
        assert_eq!(cached.count("short"), 1);
    }

    /// Counts `scale` tokens per byte and how often it was asked.
    #[derive(Debug)]
    struct Counting {
        scale: usize,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Tokenizer for Counting {
        fn count(&self, text: &str) -> usize {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            text.len() * self.scale
        }
    }

    fn counting(scale: usize) -> Arc<Counting> {
        Arc::new(Counting {
            scale,
            asked: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    #[test]
    fn the_cache_asks_the_tokenizer_once_per_text() {
        let inner = counting(1);
        let cached = CachedTokenizer::new(inner.clone());
        let texts: Vec<String> = (0..1000).map(|i| format!("text number {i}")).collect();
        let first: Vec<usize> = texts.iter().map(|t| cached.count(t)).collect();
        let again: Vec<usize> = texts.iter().map(|t| cached.count(t)).collect();
        let expected: Vec<usize> = texts.iter().map(String::len).collect();
        assert_eq!((first, again), (expected.clone(), expected));
        // 1,000 texts in 65,536 slots: a few may share one and be counted again.
        let asked = inner.asked.load(std::sync::atomic::Ordering::Relaxed);
        assert!((1000..1100).contains(&asked), "asked {asked} times");
    }

    #[test]
    fn a_count_too_large_for_a_slot_is_counted_every_time_and_right() {
        let inner = counting(1 << 20);
        let cached = CachedTokenizer::new(inner.clone());
        assert_eq!(
            (cached.count("0123456789abcdef"), cached.count("0123456789abcdef")),
            (1 << 24, 1 << 24)
        );
        assert_eq!(inner.asked.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn counts_with_o200k() {
        assert_eq!(O200kTokenizer.count("hello world"), 2);
        assert_eq!(O200kTokenizer.count(""), 0);
    }

    #[test]
    fn keeps_the_newest_messages_within_the_message_limit() {
        let history: Vec<Message> = (1..=10).map(|i| msg(i, Role::User, "hi")).collect();
        let w = build_window(
            &O200kTokenizer,
            ContextLimits {
                max_messages: 3,
                max_tokens: 8000,
            },
            "sys",
            &history,
        )
        .unwrap();
        assert_eq!(seqs(&w), [8, 9, 10]);
        assert_eq!(w.dropped, 7);
    }

    #[test]
    fn never_splits_a_tool_call_from_its_results() {
        let history = vec![
            msg(1, Role::User, "read a and b"),
            call(2, &["c1", "c2"]),
            result(3, "c1", "aaa"),
            result(4, "c2", "bbb"),
            msg(5, Role::Assistant, "done"),
        ];
        // 3 messages would cut between the call and its first result: the whole group is left out.
        let w = build_window(
            &O200kTokenizer,
            ContextLimits {
                max_messages: 3,
                max_tokens: 8000,
            },
            "",
            &history,
        )
        .unwrap();
        assert_eq!(seqs(&w), [5]);
        let w = build_window(
            &O200kTokenizer,
            ContextLimits {
                max_messages: 4,
                max_tokens: 8000,
            },
            "",
            &history,
        )
        .unwrap();
        assert_eq!(seqs(&w), [2, 3, 4, 5]);
    }

    #[test]
    fn orphan_results_at_the_start_are_not_sent() {
        let history = vec![
            result(3, "c1", "aaa"),
            result(4, "c2", "bbb"),
            msg(5, Role::User, "next"),
        ];
        let w = build_window(&O200kTokenizer, ContextLimits::default(), "", &history).unwrap();
        assert_eq!(seqs(&w), [5]);
    }

    #[test]
    fn token_limit_counts_the_system_prompt() {
        let long = "word ".repeat(100);
        let history = vec![
            msg(1, Role::User, &long),
            msg(2, Role::User, &long),
            msg(3, Role::User, "short"),
        ];
        let per = message_tokens(&O200kTokenizer, &history[0]);
        let sys = O200kTokenizer.count("system") + MESSAGE_OVERHEAD;
        let short = message_tokens(&O200kTokenizer, &history[2]);
        let limits = ContextLimits {
            max_messages: 50,
            max_tokens: sys + short + per,
        };
        let w = build_window(&O200kTokenizer, limits, "system", &history).unwrap();
        assert_eq!(seqs(&w), [2, 3]);
        assert_eq!(w.tokens, sys + short + per);
    }

    #[test]
    fn newest_message_too_large_is_context_too_large() {
        let history = vec![msg(1, Role::User, &"word ".repeat(50))];
        let err = build_window(
            &O200kTokenizer,
            ContextLimits {
                max_messages: 50,
                max_tokens: 20,
            },
            "sys",
            &history,
        )
        .unwrap_err();
        assert_eq!(err.code(), "CONTEXT_TOO_LARGE");
    }

    #[test]
    fn tool_results_too_large_for_the_window_are_cut_to_fit() {
        let big = "0123456789 ".repeat(3000);
        let history = vec![
            msg(1, Role::User, "list it"),
            call(2, &["c1"]),
            result(3, "c1", &big),
        ];
        let limits = ContextLimits {
            max_messages: 50,
            max_tokens: 1000,
        };
        let w = build_window(&O200kTokenizer, limits, "sys", &history).unwrap();
        assert!(w.tokens <= 1000, "{}", w.tokens);
        let cut = &w.messages.last().unwrap().content;
        assert!(cut.contains("[output truncated:"), "{cut}");
        assert_eq!(w.messages.last().unwrap().tool_call_id.as_deref(), Some("c1"));
        assert_eq!(w.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn truncation_notes_what_was_cut_on_a_char_boundary() {
        assert_eq!(truncate_output("short", 10), "short");
        assert_eq!(
            truncate_output("ééé", 3),
            "é\n[output truncated: 4 of 6 bytes cut]"
        );
    }
}

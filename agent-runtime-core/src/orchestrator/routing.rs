//! Routing (API.md §5.1): the orchestrator's forced `route` function call, the keyword classifier
//! that decides when the model cannot (saying why in the switch's reason), and `switch_agent`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::protocol::ToolSpec;

/// The name of the forced routing function.
pub const ROUTE_TOOL: &str = "route";
/// The routing choice that asks for a plan instead of one agent.
pub const PLAN_CHOICE: &str = "plan";
/// The name of the forced plan function.
pub const PLAN_TOOL: &str = "propose_plan";
/// The name of the runtime's hand-over tool.
pub const SWITCH_TOOL: &str = "switch_agent";

/// The routing function: an enum of the choices (agents, and `plan` when plans are on) and a reason.
pub fn route_spec(agents: &[String]) -> ToolSpec {
    ToolSpec {
        name: ROUTE_TOOL.into(),
        description: "Choose the agent that should handle the user's request.".into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "agent": {"type": "string", "enum": agents, "description": "The agent that handles the request"},
                "reason": {"type": "string", "maxLength": 200, "description": "Why this agent fits, in one sentence"}
            },
            "required": ["agent", "reason"],
            "additionalProperties": false
        }),
    }
}

/// The hand-over tool offered to every agent while automatic switching is on.
pub fn switch_spec(agents: &[String]) -> ToolSpec {
    ToolSpec {
        name: SWITCH_TOOL.into(),
        description:
            "Hand the conversation over to another agent that fits the task better; it continues this turn."
                .into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "agent_type": {"type": "string", "enum": agents, "description": "The agent to hand over to"},
                "reason": {"type": "string", "description": "Why"}
            },
            "required": ["agent_type"],
            "additionalProperties": false
        }),
    }
}

/// The system prompt of the routing call.
pub fn route_prompt(agents: &[(String, String)], plans: bool) -> String {
    let mut s = String::from(
        "You route a coding assistant's requests. Call the route function with the agent that should \
         handle the user's request:\n",
    );
    for (t, d) in agents {
        s.push_str(&format!("- {t}: {d}\n"));
    }
    if plans {
        s.push_str("- plan: only for a large request that needs several of these agents one after another\n");
    }
    s
}

/// The plan function: a goal and ordered subtasks, each for one agent.
pub fn plan_spec(agents: &[String]) -> ToolSpec {
    ToolSpec {
        name: PLAN_TOOL.into(),
        description: "Propose a plan: the goal and the ordered subtasks, each done by one agent.".into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "goal": {"type": "string", "description": "What the plan achieves"},
                "subtasks": {
                    "type": "array", "minItems": 1, "maxItems": 10,
                    "items": {
                        "type": "object",
                        "properties": {
                            "description": {"type": "string"},
                            "agent": {"type": "string", "enum": agents}
                        },
                        "required": ["description", "agent"],
                        "additionalProperties": false
                    }
                }
            },
            "required": ["goal", "subtasks"],
            "additionalProperties": false
        }),
    }
}

/// The system prompt of the plan call.
pub fn plan_prompt(agents: &[(String, String)]) -> String {
    let mut s = String::from(
        "You plan a coding assistant's work. Call propose_plan with the goal and 2 to 6 ordered subtasks; \
         give each subtask to one of these agents:\n",
    );
    for (t, d) in agents {
        s.push_str(&format!("- {t}: {d}\n"));
    }
    s
}

/// Reads `{"agent": ..., "reason": ...}` from the route call's arguments; `None` if the agent is
/// not one of `allowed`.
pub fn parse_route(arguments: &str, allowed: &[String]) -> Option<(String, String)> {
    let Some(v) = parse_arguments(arguments) else {
        // Cut short (e.g. a rambling reason hit max_tokens): the agent usually came first.
        let agent = string_field(arguments, "agent")?.to_ascii_lowercase();
        return allowed.contains(&agent).then(|| (agent, String::new()));
    };
    let agent = v.get("agent")?.as_str()?.trim().to_ascii_lowercase();
    if !allowed.contains(&agent) {
        return None;
    }
    let reason = v
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    Some((agent, reason))
}

/// Parses a model's function arguments leniently: raw control characters inside strings (which
/// grammar-constrained small models emit) are escaped, and a Markdown code fence is ignored.
pub fn parse_arguments(text: &str) -> Option<Value> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .unwrap_or(t);
    let t = t.strip_suffix("```").unwrap_or(t).trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let mut fixed = String::with_capacity(t.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    for ch in t.chars() {
        match ch {
            _ if escaped => {
                escaped = false;
                fixed.push(ch);
            }
            '\\' if in_string => {
                escaped = true;
                fixed.push(ch);
            }
            '"' => {
                in_string = !in_string;
                fixed.push(ch);
            }
            '\n' if in_string => fixed.push_str("\\n"),
            '\r' if in_string => fixed.push_str("\\r"),
            '\t' if in_string => fixed.push_str("\\t"),
            c if in_string && (c as u32) < 0x20 => fixed.push_str(&format!("\\u{:04x}", c as u32)),
            c => fixed.push(c),
        }
    }
    serde_json::from_str(&fixed).ok()
}

/// The value of `"key": "value"` found in text that is not valid JSON (first occurrence).
fn string_field(text: &str, key: &str) -> Option<String> {
    let at = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = text[at..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].trim().to_string())
}

const DEBUG_WORDS: &[&str] = &[
    "ошибк",
    "баг",
    "отлад",
    "исключени",
    "падает",
    "упал",
    "не работает",
    "сломал",
    "причин",
    "стектрейс",
    "error",
    "bug",
    "debug",
    "exception",
    "traceback",
    "stack trace",
    "crash",
    "fails",
    "failing",
    "broken",
    "doesn't work",
    "not working",
];
const ARCHITECT_WORDS: &[&str] = &[
    "архитектур",
    "спроектир",
    "проектирова",
    "дизайн систем",
    "структур",
    "диаграм",
    "компонент",
    "architecture",
    "architect",
    "design",
    "diagram",
    "structure",
    "scalab",
];
const CODER_WORDS: &[&str] = &[
    "создай",
    "напиши",
    "реализ",
    "добав",
    "исправь",
    "измени",
    "рефактор",
    "удали",
    "сделай",
    "виджет",
    "функци",
    "класс",
    "create",
    "implement",
    "write",
    "add ",
    "fix",
    "refactor",
    "change",
    "update",
    "delete",
    "remove",
    "build",
    "code",
];
const ASK_WORDS: &[&str] = &[
    "что такое",
    "как ",
    "почему",
    "зачем",
    "объясни",
    "расскажи",
    "what",
    "how ",
    "why",
    "explain",
    "?",
];

/// The keyword classifier (Russian and English) used when the routing call fails: the agent and
/// what the keywords said. Debugging words win over design words, design over coding, coding over
/// questions; questions are the default.
pub fn classify_by_keywords(text: &str) -> (&'static str, &'static str) {
    let t = text.to_lowercase();
    let hit = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if hit(DEBUG_WORDS) {
        ("debug", "the request is about an error")
    } else if hit(ARCHITECT_WORDS) {
        ("architect", "the request is about design")
    } else if hit(CODER_WORDS) {
        ("coder", "the request asks for code")
    } else if hit(ASK_WORDS) {
        ("ask", "the request is a question")
    } else {
        ("ask", "no specialist matched; answering as a question")
    }
}

/// Why the routing call did not choose an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterFailure {
    /// No first byte within `ROUTING_TIMEOUT_SECS`: the model server is unreachable or stuck.
    NoAnswer(Duration),
    /// The call failed (the backend's error text).
    Failed(String),
    /// The answer named no known agent (or a plan that could not be made).
    Unusable,
}

/// The keyword classifier's choice for `text`, with a reason that says the router did not decide
/// and why: `Keyword routing (router unreachable: no answer within 5 s): the request asks for code`.
pub fn keyword_fallback(text: &str, failure: &RouterFailure) -> (&'static str, String) {
    let (agent, said) = classify_by_keywords(text);
    let why = match failure {
        RouterFailure::NoAnswer(limit) => format!(
            "router unreachable: no answer within {}",
            crate::llm::secs(*limit)
        ),
        RouterFailure::Failed(error) => {
            let mut error = error.clone();
            if error.chars().count() > 160 {
                error = error.chars().take(160).collect::<String>() + "…";
            }
            format!("router failed: {error}")
        }
        RouterFailure::Unusable => "the router's answer named no agent".to_string(),
    };
    (agent, format!("Keyword routing ({why}): {said}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_route_the_documents_examples() {
        assert_eq!(classify_by_keywords("Создай новый виджет профиля").0, "coder");
        assert_eq!(
            classify_by_keywords("Спроектируй архитектуру системы аутентификации").0,
            "architect"
        );
        assert_eq!(classify_by_keywords("Найди причину ошибки").0, "debug");
        assert_eq!(classify_by_keywords("Что такое замыкание?").0, "ask");
        assert_eq!(classify_by_keywords("Implement a login form").0, "coder");
        assert_eq!(
            classify_by_keywords("Why does this crash with a traceback").0,
            "debug"
        );
    }

    #[test]
    fn the_fallback_reason_says_why_the_router_did_not_decide() {
        assert_eq!(
            keyword_fallback("Создай виджет", &RouterFailure::NoAnswer(Duration::from_secs(5))),
            (
                "coder",
                "Keyword routing (router unreachable: no answer within 5 s): the request asks for code"
                    .to_string()
            )
        );
        assert_eq!(
            keyword_fallback("why?", &RouterFailure::Failed("boom".into())),
            (
                "ask",
                "Keyword routing (router failed: boom): the request is a question".to_string()
            )
        );
        assert_eq!(
            keyword_fallback("hello", &RouterFailure::Unusable),
            (
                "ask",
                "Keyword routing (the router's answer named no agent): no specialist matched; answering as a question"
                    .to_string()
            )
        );
    }

    #[test]
    fn arguments_with_raw_newlines_or_cut_short_still_route() {
        let allowed: Vec<String> = ["coder", "ask"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            parse_route(
                "{\"agent\": \"coder\", \"reason\": \"line one\nline two\"}",
                &allowed
            ),
            Some(("coder".into(), "line one\nline two".into()))
        );
        assert_eq!(
            parse_route(
                "{\"agent\": \"coder\", \"reason\": \"it rambles on and on",
                &allowed
            ),
            Some(("coder".into(), String::new()))
        );
        assert_eq!(parse_arguments("```json\n{\"a\": 1}\n```"), Some(json!({"a": 1})));
    }

    #[test]
    fn route_arguments_must_name_an_allowed_agent() {
        let allowed: Vec<String> = ["coder", "ask"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            parse_route(r#"{"agent": "Coder", "reason": "code"}"#, &allowed),
            Some(("coder".into(), "code".into()))
        );
        assert_eq!(parse_route(r#"{"agent": "pirate"}"#, &allowed), None);
        assert_eq!(parse_route("not json", &allowed), None);
    }
}

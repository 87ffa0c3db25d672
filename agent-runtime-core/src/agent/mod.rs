//! The agents: who answers, with which tools, under which limits (API.md §3).
//! `AgentRegistry` holds the five agents of the product by default; embedders replace or add agents.

use serde::{Deserialize, Serialize};

mod prompts;

/// Which paths an agent may write or delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PathRule {
    /// Any path inside the project.
    Any,
    /// Only paths ending in one of these suffixes (e.g. `.md`), compared case-insensitively.
    Suffixes {
        /// Allowed endings.
        suffixes: Vec<String>,
    },
    /// No writes or deletes at all.
    ReadOnly,
}

impl PathRule {
    /// Whether a write or delete of `path` is allowed.
    pub fn allows(&self, path: &str) -> bool {
        match self {
            PathRule::Any => true,
            PathRule::ReadOnly => false,
            PathRule::Suffixes { suffixes } => {
                let lower = path.to_lowercase();
                suffixes.iter().any(|s| lower.ends_with(&s.to_lowercase()))
            }
        }
    }
}

/// One agent: its identity as `GET /agents` shows it, its tools, its path rule and its prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDefinition {
    /// The agent type, e.g. `coder` (the key clients use).
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name, e.g. `Coder Agent`.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its emoji.
    pub emoji: String,
    /// The tools it may call, in the order `GET /agents` lists them.
    pub tools: Vec<String>,
    /// Its restrictions as the product states them (for display; enforcement is `tools` + `path_rule`).
    pub restrictions: Vec<String>,
    /// Which paths it may write or delete (enforced where tools execute).
    pub path_rule: PathRule,
    /// Its system prompt.
    pub system_prompt: String,
}

/// An agent as `GET /agents` shows it: identity, tools and restrictions, no prompt.
// Its JSON Schema goes into the server's OpenAPI document as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentInfo {
    /// The agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its emoji.
    pub emoji: String,
    /// Its tools.
    pub tools: Vec<String>,
    /// Its restrictions as the product states them.
    pub restrictions: Vec<String>,
    /// What the processes its tools start may do (the process sandbox); set by the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_rights: Option<crate::tools::CommandRights>,
}

impl AgentDefinition {
    /// The public view of this agent.
    pub fn info(&self) -> AgentInfo {
        AgentInfo {
            agent_type: self.agent_type.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            emoji: self.emoji.clone(),
            tools: self.tools.clone(),
            restrictions: self.restrictions.clone(),
            command_rights: None,
        }
    }

    /// Whether this agent may call `tool` at all.
    pub fn may_use(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }

    /// Checks a call of `tool` touching `paths` (written or deleted) against the agent's limits.
    /// The refusal text goes back to the model as the call's result.
    pub fn authorize(&self, tool: &str, paths: &[String]) -> Result<(), String> {
        if !self.may_use(tool) {
            return Err(format!(
                "the {} agent may not use the tool '{tool}'; its tools are: {}",
                self.agent_type,
                self.tools.join(", ")
            ));
        }
        if let Some(bad) = paths.iter().find(|p| !self.path_rule.allows(p)) {
            return Err(match &self.path_rule {
                PathRule::Suffixes { suffixes } => format!(
                    "the {} agent may only write files ending in {}; '{bad}' is refused",
                    self.agent_type,
                    suffixes.join(", ")
                ),
                _ => format!("the {} agent may not modify '{bad}'", self.agent_type),
            });
        }
        Ok(())
    }
}

/// The agents a runtime knows, in display order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRegistry {
    agents: Vec<AgentDefinition>,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        Self::defaults()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl AgentRegistry {
    /// The five agents of the product document, with exactly its texts.
    pub fn defaults() -> Self {
        let read = ["read_file", "list_files", "search_in_code"];
        let agents = vec![
            AgentDefinition {
                agent_type: "orchestrator".into(),
                name: "Orchestrator Agent".into(),
                description: "Координатор и маршрутизатор задач".into(),
                emoji: "🎭".into(),
                tools: strings(&read),
                restrictions: strings(&["Только анализ, без модификации"]),
                path_rule: PathRule::ReadOnly,
                system_prompt: prompts::ORCHESTRATOR.into(),
            },
            AgentDefinition {
                agent_type: "coder".into(),
                name: "Coder Agent".into(),
                description: "Разработчик кода".into(),
                emoji: "💻".into(),
                tools: strings(&[
                    "read_file",
                    "write_file",
                    "list_files",
                    "search_in_code",
                    "execute_command",
                    "git_diff",
                    "git_commit",
                    "delete_file",
                ]),
                restrictions: vec![],
                path_rule: PathRule::Any,
                system_prompt: prompts::CODER.into(),
            },
            AgentDefinition {
                agent_type: "architect".into(),
                name: "Architect Agent".into(),
                description: "Проектировщик архитектуры".into(),
                emoji: "🏗️".into(),
                tools: strings(&["read_file", "write_file", "list_files", "search_in_code"]),
                restrictions: strings(&["Только .md файлы"]),
                path_rule: PathRule::Suffixes {
                    suffixes: strings(&[".md"]),
                },
                system_prompt: prompts::ARCHITECT.into(),
            },
            AgentDefinition {
                agent_type: "debug".into(),
                name: "Debug Agent".into(),
                description: "Отладчик и диагност".into(),
                emoji: "🐛".into(),
                tools: strings(&["read_file", "list_files", "search_in_code", "execute_command"]),
                restrictions: strings(&["Read-only, без write_file"]),
                path_rule: PathRule::ReadOnly,
                system_prompt: prompts::DEBUG.into(),
            },
            AgentDefinition {
                agent_type: "ask".into(),
                name: "Ask Agent".into(),
                description: "Консультант и учитель".into(),
                emoji: "💬".into(),
                tools: strings(&["read_file", "search_in_code", "list_files"]),
                restrictions: strings(&["Только чтение"]),
                path_rule: PathRule::ReadOnly,
                system_prompt: prompts::ASK.into(),
            },
        ];
        AgentRegistry { agents }
    }

    /// An empty registry, for embedders that define every agent themselves.
    pub fn empty() -> Self {
        AgentRegistry { agents: vec![] }
    }

    /// Adds an agent, or replaces the one of the same type in place.
    pub fn insert(&mut self, agent: AgentDefinition) {
        match self.agents.iter_mut().find(|a| a.agent_type == agent.agent_type) {
            Some(slot) => *slot = agent,
            None => self.agents.push(agent),
        }
    }

    /// Removes an agent; returns it if it was there.
    pub fn remove(&mut self, agent_type: &str) -> Option<AgentDefinition> {
        let i = self.agents.iter().position(|a| a.agent_type == agent_type)?;
        Some(self.agents.remove(i))
    }

    /// The agent of this type.
    pub fn get(&self, agent_type: &str) -> Option<&AgentDefinition> {
        self.agents.iter().find(|a| a.agent_type == agent_type)
    }

    /// Whether an agent of this type exists.
    pub fn contains(&self, agent_type: &str) -> bool {
        self.get(agent_type).is_some()
    }

    /// Every agent, in display order.
    pub fn list(&self) -> &[AgentDefinition] {
        &self.agents
    }

    /// Adds (or replaces) the agents of a JSON file: an array of [`AgentDefinition`]s. Each agent's
    /// tools must be among `known_tools`; the error names the file and what is wrong.
    pub fn load_file(&mut self, path: &std::path::Path, known_tools: &[&str]) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let agents: Vec<AgentDefinition> = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JSON array of agents: {e}", path.display()))?;
        for agent in agents {
            if agent.agent_type.trim().is_empty() {
                return Err(format!("{}: an agent has an empty type", path.display()));
            }
            if let Some(t) = agent.tools.iter().find(|t| !known_tools.contains(&t.as_str())) {
                return Err(format!(
                    "{}: agent '{}' names an unknown tool '{t}'",
                    path.display(),
                    agent.agent_type
                ));
            }
            self.insert(agent);
        }
        Ok(())
    }

    /// The agent types, in display order.
    pub fn types(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.agent_type.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_the_product_documents_five_agents() {
        let infos: Vec<AgentInfo> = AgentRegistry::defaults()
            .list()
            .iter()
            .map(|a| a.info())
            .collect();
        let v = serde_json::to_value(infos).unwrap();
        assert_eq!(
            v,
            json!([
                {"type": "orchestrator", "name": "Orchestrator Agent", "description": "Координатор и маршрутизатор задач",
                 "emoji": "🎭", "tools": ["read_file", "list_files", "search_in_code"],
                 "restrictions": ["Только анализ, без модификации"]},
                {"type": "coder", "name": "Coder Agent", "description": "Разработчик кода", "emoji": "💻",
                 "tools": ["read_file", "write_file", "list_files", "search_in_code", "execute_command", "git_diff", "git_commit", "delete_file"],
                 "restrictions": []},
                {"type": "architect", "name": "Architect Agent", "description": "Проектировщик архитектуры", "emoji": "🏗️",
                 "tools": ["read_file", "write_file", "list_files", "search_in_code"], "restrictions": ["Только .md файлы"]},
                {"type": "debug", "name": "Debug Agent", "description": "Отладчик и диагност", "emoji": "🐛",
                 "tools": ["read_file", "list_files", "search_in_code", "execute_command"], "restrictions": ["Read-only, без write_file"]},
                {"type": "ask", "name": "Ask Agent", "description": "Консультант и учитель", "emoji": "💬",
                 "tools": ["read_file", "search_in_code", "list_files"], "restrictions": ["Только чтение"]}
            ])
        );
    }

    #[test]
    fn architect_may_write_markdown_only() {
        let reg = AgentRegistry::defaults();
        let architect = reg.get("architect").unwrap();
        assert_eq!(
            architect.authorize("write_file", &["docs/DESIGN.md".into()]),
            Ok(())
        );
        assert_eq!(
            architect.authorize("write_file", &["src/main.rs".into()]),
            Err("the architect agent may only write files ending in .md; 'src/main.rs' is refused".into())
        );
        assert!(architect.authorize("execute_command", &[]).is_err());
    }

    #[test]
    fn read_only_agents_refuse_modifying_tools() {
        let reg = AgentRegistry::defaults();
        for (agent, tool) in [
            ("debug", "write_file"),
            ("debug", "git_commit"),
            ("ask", "execute_command"),
            ("orchestrator", "delete_file"),
        ] {
            let err = reg
                .get(agent)
                .unwrap()
                .authorize(tool, &["a.md".into()])
                .unwrap_err();
            assert!(
                err.starts_with(&format!("the {agent} agent may not use the tool '{tool}'")),
                "{err}"
            );
        }
    }

    #[test]
    fn agents_are_added_from_a_json_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agents.json");
        std::fs::write(
            &file,
            r#"[{"type": "reader", "name": "Reader", "description": "Reads", "emoji": "📖",
                 "tools": ["read_file"], "restrictions": [], "path_rule": {"kind": "read_only"},
                 "system_prompt": "Read."}]"#,
        )
        .unwrap();
        let mut reg = AgentRegistry::defaults();
        reg.load_file(&file, &["read_file"]).unwrap();
        assert_eq!(reg.get("reader").unwrap().path_rule, PathRule::ReadOnly);
        assert_eq!(reg.types().len(), 6);
        std::fs::write(
            &file,
            r#"[{"type": "x", "name": "X", "description": "", "emoji": "", "tools": ["rm_rf"],
            "restrictions": [], "path_rule": {"kind": "any"}, "system_prompt": ""}]"#,
        )
        .unwrap();
        let err = reg.load_file(&file, &["read_file"]).unwrap_err();
        assert!(err.ends_with("agent 'x' names an unknown tool 'rm_rf'"), "{err}");
    }

    #[test]
    fn embedders_replace_and_add_agents() {
        let mut reg = AgentRegistry::defaults();
        let mut coder = reg.get("coder").unwrap().clone();
        coder.system_prompt = "custom".into();
        reg.insert(coder);
        reg.insert(AgentDefinition {
            agent_type: "reviewer".into(),
            name: "Reviewer".into(),
            description: "Reviews".into(),
            emoji: "🔍".into(),
            tools: vec!["read_file".into()],
            restrictions: vec![],
            path_rule: PathRule::ReadOnly,
            system_prompt: "review".into(),
        });
        assert_eq!(
            reg.types(),
            ["orchestrator", "coder", "architect", "debug", "ask", "reviewer"]
        );
        assert_eq!(reg.get("coder").unwrap().system_prompt, "custom");
        assert!(reg.remove("reviewer").is_some());
        assert!(!reg.contains("reviewer"));
    }
}

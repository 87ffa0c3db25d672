// The console's views: sign-in, the sessions list, a session's live timeline with its approvals, and
// the approvals inbox across sessions. Hash routes: #/, #/session/<id>, #/inbox.

import * as api from "./api.js";
import { Timeline, el, pretty } from "./timeline.js";

const main = document.getElementById("main");
const login = document.getElementById("login");
const loginError = document.getElementById("login-error");
const nav = document.getElementById("nav");
const enc = encodeURIComponent;

let current = null; // the view on screen: { stop(), cards? }

function problem(text) {
  return el("p", { class: "problem", role: "alert" }, text);
}

function describe(e) {
  return e instanceof api.ApiError ? `${e.code}: ${e.detail}` : String(e?.message ?? e);
}

function time(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

const STATUS_TEXT = {
  idle: "idle",
  running: "running",
  awaiting_approval: "awaiting approval",
  awaiting_tool_result: "awaiting tool result",
};

// ---------- sign-in ----------

function showLogin(message) {
  current?.stop();
  current = null;
  for (const child of [...main.children]) if (child !== login && child.tagName !== "NOSCRIPT") child.remove();
  nav.hidden = true;
  login.hidden = false;
  loginError.hidden = !message;
  loginError.textContent = message ?? "";
  document.getElementById("token").focus();
}

/** A refused token anywhere sends the tab back to the sign-in form. */
function signedOut(e) {
  if (e instanceof api.ApiError && e.status === 401) {
    api.setToken("");
    showLogin(`The server refused the token (${e.code}: ${e.detail}). Sign in again.`);
    return true;
  }
  return false;
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const candidate = document.getElementById("token").value;
  try {
    await api.get("/sessions?limit=1", candidate);
  } catch (e) {
    const why = e.status === 401
      ? `Refused: ${e.code}: ${e.detail}. Use the server's INTERNAL_API_KEY.`
      : `The server could not check the token: ${describe(e)}`;
    showLogin(why);
    return;
  }
  api.setToken(candidate);
  document.getElementById("token").value = "";
  signedIn();
});

document.getElementById("logout").addEventListener("click", () => {
  api.setToken("");
  showLogin("Token forgotten for this tab.");
});

function signedIn() {
  login.hidden = true;
  nav.hidden = false;
  window.onhashchange = route;
  route();
}

function route() {
  current?.stop();
  for (const child of [...main.children]) if (child !== login && child.tagName !== "NOSCRIPT") child.remove();
  const hash = location.hash.replace(/^#/, "");
  const container = el("section", { class: "view" });
  main.append(container);
  if (hash.startsWith("/session/")) current = sessionView(container, decodeURIComponent(hash.slice("/session/".length)));
  else if (hash === "/inbox") current = inboxView(container);
  else current = sessionsView(container);
}

/** Runs `fn` now and every `ms` until stopped; `fn` returning false stops it. */
function poll(fn, ms) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    const go = await fn();
    if (!stopped && go !== false) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// ---------- sessions ----------

function sessionsView(container) {
  const filter = el("input", { id: "user-filter", type: "search", placeholder: "user id", "aria-label": "Filter by user" });
  const list = el("ul", { class: "sessions", id: "sessions", "aria-live": "polite" });
  const status = el("p", { class: "quiet", id: "sessions-status" }, "Loading…");
  const confirming = new Set();

  const userId = el("input", { id: "new-user", placeholder: "user id (optional)" });
  const projectPath = el("input", { id: "new-project", placeholder: "/absolute/path/to/project" });
  const modeProject = el("input", { type: "radio", name: "mode", value: "project", id: "mode-project", checked: true });
  const modeClient = el("input", { type: "radio", name: "mode", value: "client", id: "mode-client" });
  const createError = problem("");
  createError.hidden = true;
  const form = el("form", { class: "create", id: "create-form" },
    el("h2", {}, "New session"),
    el("label", { for: "new-user" }, "User"), userId,
    el("fieldset", {},
      el("legend", {}, "Tools run"),
      el("label", {}, modeProject, " by the runtime, in the project at"), projectPath,
      el("label", {}, modeClient, " by the client (client mode; no project path)")),
    el("button", { type: "submit" }, "Create session"),
    createError);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    if (userId.value.trim()) body.user_id = userId.value.trim();
    body.metadata = modeClient.checked
      ? { tool_execution: "client" }
      : { project_path: projectPath.value.trim() };
    try {
      const created = await api.post("/sessions", body);
      location.hash = `#/session/${enc(created.session_id)}`;
    } catch (e) {
      if (signedOut(e)) return;
      createError.hidden = false;
      createError.textContent = `Not created: ${describe(e)}`;
    }
  });

  container.append(
    el("div", { class: "columns" },
      el("div", {},
        el("h2", {}, "Sessions"),
        el("label", { class: "filter" }, "Filter by user ", filter),
        status, list),
      form));

  async function refresh() {
    const user = filter.value.trim();
    let page;
    try {
      page = await api.get(`/sessions?limit=100${user ? `&user_id=${enc(user)}` : ""}`);
    } catch (e) {
      if (signedOut(e)) return false;
      status.textContent = `Cannot list sessions: ${describe(e)}`;
      return;
    }
    const counts = await Promise.all(page.sessions.map((s) =>
      s.status === "awaiting_approval"
        ? api.get(`/sessions/${enc(s.session_id)}/pending-approvals`).then((r) => r.pending_approvals.length, () => "?")
        : 0));
    if (user !== filter.value.trim()) return; // typed again meanwhile: the next round shows it
    list.replaceChildren(...page.sessions.map((s, i) => sessionRow(s, counts[i])));
    status.textContent = `${page.sessions.length} session(s)${user ? ` of ${user}` : ""} · updated ${new Date().toLocaleTimeString()}`;
  }

  function sessionRow(s, pending) {
    const del = el("button", { type: "button", class: "danger" }, confirming.has(s.session_id) ? "Confirm delete" : "Delete");
    del.addEventListener("click", async () => {
      if (!confirming.has(s.session_id)) {
        confirming.add(s.session_id);
        del.textContent = "Confirm delete";
        return;
      }
      confirming.delete(s.session_id);
      try {
        await api.del(`/sessions/${enc(s.session_id)}`);
      } catch (e) {
        if (signedOut(e)) return;
        status.textContent = `Not deleted: ${describe(e)}`;
      }
      refresh();
    });
    return el("li", { class: "session", "data-session-id": s.session_id, "data-status": s.status },
      el("a", { href: `#/session/${enc(s.session_id)}`, class: "sid" }, s.session_id),
      el("dl", {}, [
        ["User", s.user_id ?? "—"],
        ["Status", STATUS_TEXT[s.status] ?? s.status, "status"],
        ["Agent", s.current_agent],
        ["Last activity", time(s.last_activity)],
        ["Pending approvals", String(pending), "pending"],
      ].map(([name, value, cls]) => el("div", {}, el("dt", {}, name), el("dd", { class: cls }, value)))),
      del);
  }

  let debounce = null;
  filter.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(refresh, 250);
  });
  const stop = poll(refresh, 2000);
  return { stop };
}

// ---------- approvals (inline and inbox) ----------

/** Renders pending approvals as cards, keyed by session and call id, so a refresh never wipes an edit. */
class ApprovalCards {
  constructor(root, { onEvent, showSession }) {
    this.root = root;
    this.onEvent = onEvent;
    this.showSession = showSession;
    this.cards = new Map();
  }

  sync(items) {
    const keep = new Set(items.map(({ sessionId, approval }) => `${sessionId}/${approval.call_id}`));
    for (const [key, card] of this.cards) {
      if (!keep.has(key) && !card.busy) {
        card.node.remove();
        this.cards.delete(key);
      }
    }
    for (const { sessionId, approval } of items) {
      const key = `${sessionId}/${approval.call_id}`;
      if (!this.cards.has(key)) {
        const card = this.card(sessionId, approval);
        this.cards.set(key, card);
        this.root.append(card.node);
      }
    }
  }

  first() {
    return [...this.cards.values()].find((c) => !c.busy);
  }

  card(sessionId, a) {
    const card = { busy: false };
    // A budget approval is decided on its new limit alone: approve takes the proposed one, an
    // edited limit is sent as {"limit": N}.
    const budget = a.request_type === "budget";
    const proposal = budget ? { limit: a.arguments?.proposed_limit } : a.arguments;
    const shown = pretty(proposal);
    const rows = Math.min(16, Math.max(3, shown.split("\n").length + 1));
    const args = el("textarea", { class: "args-editor", rows, spellcheck: "false", "aria-label": `Arguments of ${a.tool_name} (JSON)` }, shown);
    const feedback = el("input", { class: "feedback", placeholder: "why (sent to the model with a rejection)", "aria-label": "Feedback" });
    const error = problem("");
    error.hidden = true;
    const diff = el("div", { class: "preview" });
    const approve = el("button", { type: "button", class: "approve", "aria-keyshortcuts": "a" }, "Approve [a]");
    const reject = el("button", { type: "button", class: "reject", "aria-keyshortcuts": "r" }, "Reject [r]");
    const fail = (text) => {
      error.hidden = false;
      error.textContent = text;
    };
    const decide = async (body) => {
      error.hidden = true;
      card.busy = true;
      approve.disabled = reject.disabled = true;
      let resolved = false;
      try {
        await api.stream(`/sessions/${enc(sessionId)}/hitl-decision`, body, (ev) => {
          if (ev.type === "approval_resolved" && ev.call_id === a.call_id && !resolved) {
            resolved = true;
            card.node.setAttribute("data-decided", ev.decision);
            card.node.remove();
          }
          this.onEvent?.(sessionId, ev);
        });
      } catch (e) {
        if (signedOut(e)) return;
        fail(`The server refused the decision (${describe(e)}). The approval is still pending.`);
      } finally {
        card.busy = false;
        approve.disabled = reject.disabled = false;
      }
    };
    card.approve = () => {
      let edited;
      try {
        edited = JSON.parse(args.value);
      } catch (e) {
        fail(`The arguments are not valid JSON (${e.message}); nothing was sent.`);
        return;
      }
      const same = JSON.stringify(edited) === JSON.stringify(proposal);
      decide(same
        ? { call_id: a.call_id, decision: "approve" }
        : { call_id: a.call_id, decision: "edit", modified_arguments: edited });
    };
    card.reject = () => {
      const body = { call_id: a.call_id, decision: "reject" };
      if (feedback.value.trim()) body.feedback = feedback.value.trim();
      decide(body);
    };
    approve.addEventListener("click", card.approve);
    reject.addEventListener("click", card.reject);
    card.node = el("article", { class: "approval", "data-call-id": a.call_id, "data-session-id": sessionId },
      el("h3", {}, budget
        ? `Budget reached: ${a.arguments?.budget} (${a.arguments?.spent} of ${a.arguments?.limit})`
        : `Approval needed: ${a.request_type === "plan" ? "plan" : a.tool_name}`),
      this.showSession ? el("p", {}, "Session ", el("a", { href: `#/session/${enc(sessionId)}` }, sessionId)) : null,
      a.reason ? el("p", { class: "reason" }, `Reason: ${a.reason}`) : null,
      diff,
      el("label", {}, "Arguments (JSON; edit them to approve a changed call)", args),
      el("label", {}, "Feedback", feedback),
      el("div", { class: "actions" }, approve, reject),
      error);
    if (a.tool_name === "write_file" || a.tool_name === "delete_file") this.preview(sessionId, a, diff);
    return card;
  }

  async preview(sessionId, a, into) {
    try {
      const p = await api.get(`/sessions/${enc(sessionId)}/approvals/${enc(a.call_id)}/preview`);
      const lines = p.diff === "" ? [el("span", {}, "(no change: the file already has this content)")] : p.diff.split("\n").filter((l, i, all) => l !== "" || i < all.length - 1).map((line) => {
        const kind = line.startsWith("+++") || line.startsWith("---") ? "head" : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
        return el("span", { class: `line ${kind}` }, line);
      });
      into.replaceChildren(
        el("p", { class: "change" }, `Change: ${p.change} ${p.path} (diff of the proposed call against the file now)`),
        el("pre", { class: "diff" }, lines));
    } catch (e) {
      into.replaceChildren(el("p", { class: "quiet" }, `No preview: ${describe(e)}`));
    }
  }
}

/** `a` approves and `r` rejects the first pending approval on screen (not while typing). */
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t instanceof HTMLElement && (t.closest("input, textarea, select") || t.isContentEditable)) return;
  const card = current?.cards?.first();
  if (!card) return;
  if (ev.key === "a") {
    ev.preventDefault();
    card.approve();
  } else if (ev.key === "r") {
    ev.preventDefault();
    card.reject();
  }
});

function inboxView(container) {
  const list = el("div", { class: "cards", id: "inbox" });
  const status = el("p", { class: "quiet", id: "inbox-status" }, "Loading…");
  container.append(el("h2", {}, "Approvals inbox"),
    el("p", { class: "quiet" }, "Every pending approval of every session. Keys: a approves and r rejects the first one."),
    status, list);
  const cards = new ApprovalCards(list, { showSession: true });
  const stop = poll(async () => {
    try {
      const page = await api.get("/sessions?limit=1000");
      const waiting = page.sessions.filter((s) => s.status === "awaiting_approval");
      const lists = await Promise.all(waiting.map((s) =>
        api.get(`/sessions/${enc(s.session_id)}/pending-approvals`).then(
          (r) => r.pending_approvals.map((approval) => ({ sessionId: s.session_id, approval })),
          () => [])));
      const items = lists.flat();
      cards.sync(items);
      status.textContent = items.length === 0 ? "Nothing waits for a decision." : `${items.length} approval(s) waiting.`;
    } catch (e) {
      if (signedOut(e)) return false;
      status.textContent = `Cannot load approvals: ${describe(e)}`;
    }
  }, 3000);
  return { stop, cards };
}

// ---------- one session ----------

function sessionView(container, id) {
  const abort = new AbortController();
  const heading = el("h2", {}, "Session ", el("code", {}, id));
  const facts = el("p", { class: "facts", id: "session-facts" }, "Loading…");
  const live = el("span", { class: "live", id: "live" }, "connecting");
  const timelineList = el("ol", { class: "timeline", id: "timeline", "aria-live": "polite" });
  const approvalsBox = el("div", { class: "cards", id: "approvals" });
  const approvalsNote = el("p", { class: "quiet" }, "Nothing waits for a decision.");
  // The stored messages: the user's own messages are not events, so after a reload they are here.
  const historyList = el("ol", { class: "history" });
  const historySummary = el("summary", {}, "Stored conversation");
  const history = el("details", { id: "history" }, historySummary, historyList);
  const actionError = problem("");
  actionError.hidden = true;
  const report = (text) => {
    actionError.hidden = !text;
    actionError.textContent = text ?? "";
  };

  const timeline = new Timeline(timelineList, {
    onEvent: (e) => {
      if (e.type === "tool_call" || e.type === "approval_resolved" || e.type === "done" || e.type === "plan_proposed" || e.type === "budget_exceeded") refreshApprovals();
      if (e.type === "done" || e.type === "agent_switched") refreshFacts();
      if (e.type === "done") refreshHistory();
    },
  });
  const cards = new ApprovalCards(approvalsBox, { onEvent: (_, e) => timeline.add(e) });

  const agentSelect = el("select", { id: "agent-select", "aria-label": "Agent" });
  let agentPicked = false;
  agentSelect.addEventListener("change", () => {
    agentPicked = true;
  });
  const switchButton = el("button", { type: "button", id: "switch" }, "Switch agent");
  const cancelButton = el("button", { type: "button", id: "cancel", class: "danger" }, "Cancel turn");
  const text = el("textarea", { id: "message", rows: 3, placeholder: "Message (Ctrl+Enter sends)", "aria-label": "Message" });
  const composer = el("form", { class: "composer", id: "composer" }, text, el("button", { type: "submit" }, "Send"));

  container.append(
    heading, facts,
    el("div", { class: "controls" },
      el("label", {}, "Agent ", agentSelect), switchButton, cancelButton,
      el("span", { class: "quiet" }, "Stream: ", live)),
    actionError,
    el("h3", {}, "Approvals"),
    approvalsNote,
    approvalsBox,
    el("h3", {}, "Timeline"),
    history,
    timelineList,
    composer);

  async function refreshFacts() {
    try {
      const s = await api.get(`/sessions/${enc(id)}`);
      const where = s.metadata?.project_path ? `project ${s.metadata.project_path}` : s.metadata?.tool_execution === "client" ? "client mode" : "no project";
      facts.textContent = `Status: ${STATUS_TEXT[s.status] ?? s.status} · agent: ${s.current_agent} · user: ${s.user_id ?? "—"} · ${where} · last activity ${time(s.last_activity)}`;
      facts.setAttribute("data-status", s.status);
      if (!timeline.agent) timeline.agent = s.current_agent;
      // The picker follows the session's agent only until someone picks another one.
      if (!agentPicked) agentSelect.value = s.current_agent;
    } catch (e) {
      if (signedOut(e)) return;
      facts.textContent = `Cannot read the session: ${describe(e)}`;
    }
  }

  async function refreshHistory() {
    try {
      const r = await api.get(`/sessions/${enc(id)}/messages?limit=1000`);
      historySummary.textContent = `Stored conversation (${r.messages.length} messages)`;
      historyList.replaceChildren(...r.messages.map((m) => {
        const calls = (m.tool_calls ?? []).map((c) => `calls ${c.name}`).join(", ");
        const content = m.content || calls || "";
        return el("li", { "data-role": m.role }, el("strong", {}, `${m.role}${m.agent ? ` (${m.agent})` : ""}: `), content);
      }));
    } catch (e) {
      signedOut(e);
    }
  }

  async function refreshApprovals() {
    try {
      const r = await api.get(`/sessions/${enc(id)}/pending-approvals`);
      cards.sync(r.pending_approvals.map((approval) => ({ sessionId: id, approval })));
      approvalsNote.hidden = cards.cards.size > 0;
    } catch (e) {
      signedOut(e);
    }
  }

  async function send(message, echo) {
    report("");
    if (echo) timeline.addLocal(echo, message.agent_type);
    try {
      await api.stream("/agent/message/stream", { session_id: id, message }, (e) => timeline.add(e));
    } catch (e) {
      if (signedOut(e)) return;
      report(`Not sent: ${describe(e)}`);
    }
  }

  composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const content = text.value.trim();
    if (!content) return;
    text.value = "";
    send({ type: "user_message", content }, content);
  });
  text.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) composer.requestSubmit();
  });
  switchButton.addEventListener("click", () => {
    agentPicked = false;
    send({ type: "switch_agent", agent_type: agentSelect.value });
  });
  cancelButton.addEventListener("click", async () => {
    try {
      const r = await api.post(`/sessions/${enc(id)}/cancel`);
      report(r.status === "idle" ? "Nothing was running." : "");
    } catch (e) {
      if (!signedOut(e)) report(`Not cancelled: ${describe(e)}`);
    }
    refreshFacts();
  });

  refreshHistory();
  api.get("/agents").then((r) => {
    agentSelect.replaceChildren(...r.agents.map((a) => el("option", { value: a.type }, `${a.emoji ?? ""} ${a.name} (${a.type})`.trim())));
    refreshFacts();
  }, (e) => signedOut(e));

  api.follow(id, () => timeline.lastSeq, (e) => timeline.add(e), (state) => {
    if (state instanceof api.ApiError) {
      if (!signedOut(state)) live.textContent = `stopped: ${describe(state)}`;
    } else {
      live.textContent = state;
    }
  }, abort.signal);

  const stopFacts = poll(async () => {
    await refreshFacts();
    await refreshApprovals();
  }, 3000);
  return {
    cards,
    timeline,
    stop() {
      abort.abort();
      stopFacts();
    },
  };
}

// ---------- start ----------

(async () => {
  try {
    await api.get("/sessions?limit=1");
  } catch (e) {
    if (e.status === 401) {
      const had = api.token() !== "";
      api.setToken("");
      showLogin(had ? `The token kept for this tab was refused (${describe(e)}). Sign in again.` : "");
      return;
    }
    showLogin(`The server cannot be used: ${describe(e)}`);
    return;
  }
  signedIn();
})();

// A session's timeline: events applied strictly in `seq` order, each exactly once, whichever stream
// (the POST's own or the follow stream) brings it first; streamed tokens are assembled into messages.

/** Makes an element: `el("li", {class: "x", "data-seq": 3}, child, "text")`. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const pretty = (v) => JSON.stringify(v, null, 2);

function usageText(u) {
  if (!u) return "";
  return ` · usage: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`;
}

export class Timeline {
  /** `root` is the list to render into; `hooks.onEvent(event)` hears each event once, in order. */
  constructor(root, hooks = {}) {
    this.root = root;
    this.hooks = hooks;
    this.lastSeq = 0;
    this.waiting = new Map();
    this.open = null; // the assistant message tokens are streaming into
    this.calls = new Map(); // call_id → its card
    this.agent = "";
  }

  /** Takes an event from any stream: applied once, after every event before it. */
  add(event) {
    const seq = Number(event.seq);
    if (!Number.isInteger(seq) || seq <= this.lastSeq || this.waiting.has(seq)) return;
    this.waiting.set(seq, event);
    while (this.waiting.has(this.lastSeq + 1)) {
      const next = this.waiting.get(this.lastSeq + 1);
      this.waiting.delete(this.lastSeq + 1);
      this.lastSeq += 1;
      this.render(next);
      this.hooks.onEvent?.(next);
    }
  }

  /** The message this tab sent (not an event of the session: shown without a seq). */
  addLocal(text, agentType) {
    this.open = null;
    const note = agentType ? ` (to ${agentType})` : "";
    this.append(el("li", { class: "item you" }, el("span", { class: "kind" }, `You${note}`), el("p", { class: "text" }, text)));
  }

  append(node) {
    const stick = this.root.scrollHeight - this.root.scrollTop - this.root.clientHeight < 40;
    this.root.append(node);
    if (stick) node.scrollIntoView({ block: "end" });
  }

  message() {
    if (!this.open) {
      const text = el("p", { class: "text" });
      const item = el("li", { class: "item assistant", "data-state": "streaming" },
        el("span", { class: "kind" }, `Assistant${this.agent ? ` (${this.agent})` : ""}`), text);
      this.append(item);
      this.open = { item, text };
    }
    return this.open;
  }

  card(callId) {
    return this.calls.get(callId);
  }

  render(e) {
    const seq = e.seq;
    switch (e.type) {
      case "assistant_message": {
        if (!e.is_final) {
          this.message().text.append(el("span", { class: "token", "data-seq": seq }, e.token ?? ""));
          return;
        }
        const m = this.open ?? this.message();
        if (m.text.childNodes.length === 0) m.text.append(el("span", { class: "token" }, e.content ?? ""));
        m.item.setAttribute("data-state", "complete");
        m.item.append(el("span", { class: "mark", "data-seq": seq }, "message complete"));
        this.open = null;
        return;
      }
      case "agent_switched":
        this.open = null;
        this.agent = e.to_agent;
        this.append(el("li", { class: "item switch", "data-seq": seq },
          el("span", { class: "kind" }, "Agent switch"),
          el("p", {}, `${e.from_agent} → ${e.to_agent}`, e.reason ? `: ${e.reason}` : "")));
        return;
      case "tool_call": {
        this.open = null;
        const label = e.requires_approval ? "needs approval" : "runs";
        const item = el("li", { class: "item tool", "data-seq": seq, "data-call-id": e.call_id },
          el("span", { class: "kind" }, `Tool call ${e.tool_name} (${label})`),
          e.reason ? el("p", { class: "reason" }, `Reason: ${e.reason}`) : null,
          el("pre", { class: "args" }, pretty(e.arguments)));
        this.calls.set(e.call_id, item);
        this.append(item);
        return;
      }
      case "tool_result": {
        const body = e.error
          ? el("div", { class: "result failed", "data-seq": seq }, el("strong", {}, `Result of ${e.tool_name}: error ${e.error.code}`), el("pre", {}, e.error.message))
          : el("div", { class: "result", "data-seq": seq }, el("strong", {}, `Result of ${e.tool_name}`), el("pre", {}, typeof e.result === "string" ? e.result : pretty(e.result)));
        const card = this.card(e.call_id);
        if (card) card.append(body);
        else this.append(el("li", { class: "item tool" }, body));
        this.open = null;
        return;
      }
      case "approval_resolved": {
        const note = el("p", { class: "decision", "data-seq": seq }, `Decision: ${e.decision}`);
        const card = this.card(e.call_id);
        if (card) card.append(note);
        else this.append(el("li", { class: "item tool" }, note));
        return;
      }
      case "plan_proposed":
      case "plan_updated":
        this.open = null;
        this.append(el("li", { class: "item plan", "data-seq": seq },
          el("span", { class: "kind" }, e.type === "plan_proposed" ? "Plan proposed" : "Plan updated"),
          el("p", {}, e.goal ?? ""),
          el("ol", {}, (e.subtasks ?? []).map((t) =>
            el("li", {}, `[${t.status ?? "pending"}] ${t.agent ? `${t.agent}: ` : ""}${t.description ?? t.title ?? pretty(t)}`)))));
        return;
      case "budget_exceeded":
        this.open = null;
        this.append(el("li", { class: "item plan", "data-seq": seq },
          el("span", { class: "kind" }, `Budget reached: ${e.budget}`),
          el("p", {}, `${e.spent} of ${e.limit} spent; approve to raise it to ${e.proposed_limit}`)));
        return;
      case "turn_resumed": {
        // Tokens streamed after `after_seq` belonged to an answer that was cut: that answer is
        // asked again, so they are struck from the timeline (an item left empty goes too).
        for (const t of this.root.querySelectorAll(".token[data-seq]")) {
          if (Number(t.getAttribute("data-seq")) <= e.after_seq) continue;
          const item = t.closest(".item");
          t.remove();
          if (item && item.querySelectorAll(".token").length === 0) item.remove();
        }
        this.open = null;
        const why = e.reason === "handed_over" ? "its process was shutting down" : "its process stopped";
        this.append(el("li", { class: "item switch", "data-seq": seq },
          el("span", { class: "kind" }, "Turn resumed"),
          el("p", {}, `Another process continues the turn (${why}).`)));
        return;
      }
      case "error":
        this.open = null;
        this.append(el("li", { class: "item error", "data-seq": seq },
          el("span", { class: "kind" }, `Error ${e.code}`), el("p", {}, e.message)));
        return;
      case "done":
        this.open = null;
        this.append(el("li", { class: "item done", "data-seq": seq },
          el("span", { class: "kind" }, "Turn ended"), el("p", {}, `${e.stop_reason}${usageText(e.usage)}`)));
        return;
      default:
        this.append(el("li", { class: "item other", "data-seq": seq }, el("span", { class: "kind" }, e.type), el("pre", {}, pretty(e))));
    }
  }
}

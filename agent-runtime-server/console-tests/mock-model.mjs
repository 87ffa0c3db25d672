// A scriptable OpenAI-compatible model server for the console's browser tests: streams scripted
// answers (text tokens, optionally slowly, or tool calls) and records every request it gets.

import http from "node:http";

let ids = 0;

/** An answer streamed as these tokens, `delayMs` apart. */
export const text = (tokens, { delayMs = 0 } = {}) => ({ tokens, toolCalls: [], delayMs });

/** An answer that calls one tool. */
export const toolCall = (name, args, id = `call_mock_${++ids}`) => ({
  tokens: [],
  toolCalls: [{ id, name, arguments: JSON.stringify(args) }],
  delayMs: 0,
});

/** The orchestrator's routing call choosing `agent`. */
export const route = (agent, reason = "the request is code work") => toolCall("route", { agent, reason });

const chunk = (delta, finish = null) => ({
  id: "chatcmpl-mock",
  object: "chat.completion.chunk",
  model: "mock",
  choices: [{ index: 0, delta, finish_reason: finish }],
});

export class MockModel {
  constructor() {
    this.queue = [];
    this.requests = [];
    this.server = http.createServer((req, res) => this.handle(req, res));
  }

  /** Queues answers for the next chat requests, in order. */
  script(...answers) {
    this.queue.push(...answers);
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    const { port } = this.server.address();
    this.url = `http://127.0.0.1:${port}`;
    return this;
  }

  async stop() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  async handle(req, res) {
    if (req.method === "GET") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ object: "list", data: [{ id: "mock", object: "model" }] }));
      return;
    }
    let body = "";
    for await (const part of req) body += part;
    const request = JSON.parse(body || "{}");
    this.requests.push(request);
    const answer = this.queue.shift() ?? text(["MOCK: no scripted answer left"]);
    let gone = false;
    res.on("close", () => {
      gone = true;
    });
    res.writeHead(200, { "content-type": "text/event-stream" });
    const send = (value) => res.write(`data: ${JSON.stringify(value)}\n\n`);
    send(chunk({ role: "assistant", content: null }));
    for (const token of answer.tokens) {
      if (gone) return;
      send(chunk({ content: token }));
      if (answer.delayMs) await new Promise((r) => setTimeout(r, answer.delayMs));
    }
    answer.toolCalls.forEach((call, index) => {
      send(chunk({ tool_calls: [{ index, id: call.id, type: "function", function: { name: call.name, arguments: "" } }] }));
      send(chunk({ tool_calls: [{ index, function: { arguments: call.arguments } }] }));
    });
    send(chunk({}, answer.toolCalls.length ? "tool_calls" : "stop"));
    if (request.stream_options?.include_usage) {
      send({ id: "chatcmpl-mock", object: "chat.completion.chunk", choices: [],
        usage: { prompt_tokens: 10, completion_tokens: Math.max(1, answer.tokens.length), total_tokens: 0 } });
    }
    res.end("data: [DONE]\n\n");
  }
}

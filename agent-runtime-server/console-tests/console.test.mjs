// The console in a real headless Chromium (Debian's /usr/bin/chromium through playwright-core)
// against the real server binary and a scripted mock model. Run: bash agent-runtime-server/console-tests/run.sh

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { createInterface } from "node:readline";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { MockModel, route, text, toolCall } from "./mock-model.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SERVER = process.env.AGENT_RUNTIME_SERVER_BIN ?? join(repo, "target/debug/agent-runtime-server");
const SHOTS = join(repo, "docs");
const TOKEN = "console-test-token";

let model;
let server;
let base;
let browser;
let page;
let work;
let project;
let sessionId;
let proxy;
/** Uncaught errors and content-security-policy violations seen by the main page. */
const pageErrors = [];

async function startServer() {
  const child = spawn(SERVER, [], {
    env: {
      PATH: process.env.PATH,
      PORT: "0",
      DATABASE_URL: `sqlite://${join(work, "rt.db")}`,
      LLM_PROXY_URL: model.url,
      INTERNAL_API_KEY: TOKEN,
      LOG_LEVEL: "warn",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const line = await new Promise((resolveLine, reject) => {
    const lines = createInterface({ input: child.stdout });
    lines.once("line", resolveLine);
    child.once("exit", (code) => reject(new Error(`the server exited with ${code} before listening`)));
  });
  const addr = line.replace(/^listening on /, "");
  assert.notEqual(addr, line, `unexpected first line from the server: ${line}`);
  return { child, base: `http://${addr}` };
}

/**
 * A TCP proxy in front of the server whose `drop()` cuts every open connection, as a network would,
 * and whose `retarget(url)` sends new connections to another server (a load balancer after a restart).
 */
async function startProxy(target) {
  let [host, port] = [target.hostname, Number(target.port)];
  const sockets = new Set();
  const proxy = net.createServer((client) => {
    const upstream = net.connect(port, host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    // A server that is down refuses the connection: so does the proxy.
    upstream.on("error", () => client.destroy());
    client.pipe(upstream).pipe(client);
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  return {
    base: `http://127.0.0.1:${proxy.address().port}`,
    drop: () => sockets.forEach((s) => s.destroy()),
    retarget: (url) => {
      [host, port] = [url.hostname, Number(url.port)];
    },
    close: () => new Promise((r) => {
      sockets.forEach((s) => s.destroy());
      proxy.close(r);
    }),
  };
}

/** The API, straight (not through the page), to check what the console did. */
async function api(path) {
  const r = await fetch(base + path, { headers: { "x-internal-auth": TOKEN } });
  return { status: r.status, body: await r.json() };
}

async function signIn(p, token = TOKEN) {
  await p.goto(`${base}/console/`);
  await p.locator("#login").waitFor({ state: "visible" });
  await p.fill("#token", token);
  await p.click("#login-form button[type=submit]");
}

/** The session's stored events, as `GET /sessions/{id}/events` replays them (the turn has ended). */
async function storedEvents(id) {
  const r = await fetch(`${base}/sessions/${encodeURIComponent(id)}/events?after=0`, { headers: { "x-internal-auth": TOKEN } });
  assert.equal(r.status, 200);
  return (await r.text()).split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)));
}

/** Every `data-seq` on the timeline, in document order. */
const seqs = (p) => p.$$eval("#timeline [data-seq]", (nodes) => nodes.map((n) => Number(n.dataset.seq)));

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium is not at ${CHROMIUM}: install it with 'apt-get install -y chromium' (.ci/run does), or set CHROMIUM`);
  }
  if (!existsSync(SERVER)) {
    throw new Error(`the server binary is not at ${SERVER}: build it with 'cargo build -p agent-runtime-server' or set AGENT_RUNTIME_SERVER_BIN`);
  }
  work = mkdtempSync(join(tmpdir(), "console-test-"));
  project = join(work, "project");
  mkdirSync(project);
  model = await new MockModel().start();
  let direct;
  ({ child: server, base: direct } = await startServer());
  // The browser reaches the server through a proxy that can cut its connections.
  proxy = await startProxy(new URL(direct));
  base = proxy.base;
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("console", (m) => {
    if (m.text().includes("Content Security Policy")) pageErrors.push(m.text());
  });
});

after(async () => {
  await browser?.close();
  await proxy?.close();
  server?.kill("SIGTERM");
  await model?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

test("without a token nothing but the sign-in form loads, and a wrong token is refused", async () => {
  const dataCalls = [];
  const listen = (r) => {
    if (!r.url().includes("/console/")) dataCalls.push(`${r.url().replace(base, "")} ${r.status()}`);
  };
  page.on("response", listen);
  await signIn(page, "not-the-token");
  await page.locator("#login-error:not([hidden])").waitFor();
  page.off("response", listen);
  assert.equal(
    await page.textContent("#login-error"),
    "Refused: UNAUTHORIZED: missing or wrong x-internal-auth token. Use the server's INTERNAL_API_KEY.",
  );
  assert.deepEqual(
    { nav: await page.isHidden("#nav"), sessions: await page.locator("#sessions").count(), stored: await page.evaluate(() => sessionStorage.length) },
    { nav: true, sessions: 0, stored: 0 },
  );
  // The only data calls were refused: the probe on load and the wrong token's check.
  assert.deepEqual(dataCalls, ["/sessions?limit=1 401", "/sessions?limit=1 401"]);
  await page.screenshot({ path: join(SHOTS, "console-login.png") });
});

test("signing in and creating a session opens its timeline", async () => {
  await signIn(page);
  await page.locator("#nav").waitFor();
  await page.locator("#sessions-status").waitFor();
  await page.fill("#new-user", "alice");
  await page.fill("#new-project", project);
  await page.click("#create-form button[type=submit]");
  await page.waitForURL(/#\/session\//);
  sessionId = decodeURIComponent(new URL(page.url()).hash.replace("#/session/", ""));
  const { body } = await api(`/sessions/${sessionId}`);
  assert.deepEqual(
    { user: body.user_id, metadata: body.metadata, status: body.status, token: await page.evaluate(() => sessionStorage.getItem("agent-runtime.token")) },
    { user: "alice", metadata: { project_path: project }, status: "idle", token: TOKEN },
  );
  await page.locator("#live", { hasText: "live" }).waitFor();
});

test("a message's tokens appear while they stream and end as one message", async () => {
  model.script(route("coder"), text(["Привет", ",", " я", " кодер", "."], { delayMs: 300 }));
  await page.fill("#message", "Создай виджет профиля");
  await page.click("#composer button[type=submit]");
  const streaming = page.locator('.item.assistant[data-state="streaming"] .text');
  await streaming.waitFor();
  await page.waitForFunction(() => document.querySelectorAll(".item.assistant .token").length >= 2);
  const partial = await page.textContent(".item.assistant .text");
  await page.locator('.item.assistant[data-state="complete"]').waitFor();
  await page.locator("#timeline .item.done").waitFor();
  const items = await page.$$eval("#timeline > li", (lis) => lis.map((li) => [...li.children].map((c) => c.textContent).join(" | ")));
  assert.ok("Привет, я кодер.".startsWith(partial) && partial.length < "Привет, я кодер.".length, `partial text ${partial}`);
  assert.deepEqual(items, [
    "You | Создай виджет профиля",
    "Agent switch | orchestrator → coder: the request is code work",
    "Assistant (coder) | Привет, я кодер. | message complete",
    "Turn ended | completed · usage: 20 prompt + 6 completion tokens",
  ]);
  // agent_switched, five tokens, the complete message, done: each once, in order.
  assert.deepEqual(await seqs(page), [1, 2, 3, 4, 5, 6, 7, 8]);
});

test("reloading in the middle of a stream continues the timeline without a gap or a duplicate", async () => {
  const tokens = Array.from({ length: 16 }, (_, i) => `w${i} `);
  model.script(text(tokens, { delayMs: 200 }));
  await page.fill("#message", "Расскажи подробнее");
  await page.click("#composer button[type=submit]");
  await page.waitForFunction(() => document.querySelectorAll('.item.assistant[data-state="streaming"] .token').length >= 3);
  await page.reload();
  await page.locator("#timeline .item.done >> nth=1").waitFor({ timeout: 20000 });
  const messages = await page.$$eval("#timeline .item.assistant .text", (ps) => ps.map((p) => p.textContent));
  const got = await seqs(page);
  assert.deepEqual(messages, ["Привет, я кодер.", tokens.join("")]);
  assert.deepEqual(got, Array.from({ length: got.length }, (_, i) => i + 1));
  assert.equal(got.length, 8 + tokens.length + 2);
  // The user's messages are not events: after the reload the stored conversation shows them.
  await page.locator("#history summary", { hasText: "(4 messages)" }).waitFor();
  const history = await page.$$eval("#history li", (lis) => lis.map((li) => li.textContent));
  assert.deepEqual(history, [
    "user (orchestrator): Создай виджет профиля",
    "assistant (coder): Привет, я кодер.",
    "user (coder): Расскажи подробнее",
    `assistant (coder): ${tokens.join("")}`,
  ]);
});

test("after a dropped connection the timeline resumes with Last-Event-ID, missing nothing", async () => {
  const resumes = [];
  const listen = (r) => {
    if (r.url().includes("/events?follow=true")) resumes.push(Number(r.headers()["last-event-id"]));
  };
  page.on("request", listen);
  const before = (await seqs(page)).length;
  const tokens = Array.from({ length: 12 }, (_, i) => `d${i} `);
  model.script(text(tokens, { delayMs: 200 }));
  await page.fill("#message", "Продолжай");
  await page.click("#composer button[type=submit]");
  await page.waitForFunction(() => document.querySelectorAll('.item.assistant[data-state="streaming"] .token').length >= 3);
  proxy.drop();
  await page.locator("#timeline .item.done >> nth=2").waitFor({ timeout: 20000 });
  page.off("request", listen);
  const got = await seqs(page);
  const messages = await page.$$eval("#timeline .item.assistant .text", (ps) => ps.map((p) => p.textContent));
  assert.deepEqual(messages.at(-1), tokens.join(""));
  assert.deepEqual(got, Array.from({ length: before + tokens.length + 2 }, (_, i) => i + 1));
  // It reconnected from where it was, not from the start.
  assert.ok(resumes.length > 0 && resumes.every((seq) => seq > before), `reconnects from ${resumes}`);
});

test("an approval shows the diff, refuses a bad edit, and runs the edited arguments", async () => {
  writeFileSync(join(project, "notes.txt"), "original line\n");
  model.script(toolCall("write_file", { path: "notes.txt", content: "proposed line\n" }, "call_write"), text(["Записал."]));
  await page.fill("#message", "Запиши заметку");
  await page.click("#composer button[type=submit]");
  const card = page.locator('#approvals .approval[data-call-id="call_write"]');
  await card.locator(".diff").waitFor();
  assert.equal(
    await card.locator(".diff").innerText(),
    "--- a/notes.txt\n+++ b/notes.txt\n@@ -1 +1 @@\n-original line\n+proposed line",
  );
  await page.screenshot({ path: join(SHOTS, "console-session.png"), fullPage: true });

  await card.locator("textarea").fill('{"path": "../outside.txt", "content": "x"}');
  await card.locator("button.approve").click();
  await card.locator(".problem:not([hidden])").waitFor();
  assert.equal(
    await card.locator(".problem").textContent(),
    "The server refused the decision (INVALID_TOOL: path '../outside.txt' resolves outside the project). The approval is still pending.",
  );
  const still = await api(`/sessions/${sessionId}/pending-approvals`);
  assert.deepEqual(still.body.pending_approvals.map((a) => a.call_id), ["call_write"]);

  await card.locator("textarea").fill(JSON.stringify({ path: "notes.txt", content: "edited by a human\n" }, null, 2));
  await page.click("#session-facts"); // out of the editor: the shortcut does not fire while typing
  await page.keyboard.press("a");
  await page.locator('#timeline .decision', { hasText: "Decision: edit" }).waitFor();
  await page.locator("#timeline .item.done >> nth=4").waitFor();
  assert.equal(readFileSync(join(project, "notes.txt"), "utf8"), "edited by a human\n");
  assert.equal(await card.count(), 0);
});

test("the sessions list shows who waits for what and filters by user", async () => {
  model.script(toolCall("delete_file", { path: "notes.txt" }, "call_delete"), text(["Не удаляю."]));
  await page.fill("#message", "Удали заметку");
  await page.click("#composer button[type=submit]");
  await page.locator('#approvals .approval[data-call-id="call_delete"]').waitFor();
  await page.goto(`${base}/console/#/`);
  const row = page.locator(`#sessions li[data-session-id="${sessionId}"]`);
  await row.locator(".pending", { hasText: "1" }).waitFor();
  const facts = await row.locator("dd").allTextContents();
  assert.deepEqual([facts[0], facts[1], facts[2], facts[4]], ["alice", "awaiting approval", "coder", "1"]);
  await page.screenshot({ path: join(SHOTS, "console-sessions.png") });
  await page.fill("#user-filter", "bob");
  await page.locator("#sessions-status", { hasText: "0 session(s) of bob" }).waitFor();
  assert.equal(await page.locator("#sessions li").count(), 0);
  await page.fill("#user-filter", "");
});

test("a rejection from the inbox carries its feedback to the model", async () => {
  await page.goto(`${base}/console/#/inbox`);
  const card = page.locator('#inbox .approval[data-call-id="call_delete"]');
  await card.locator(".diff").waitFor();
  assert.equal(await card.locator(".diff").innerText(), "--- a/notes.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-edited by a human");
  await page.screenshot({ path: join(SHOTS, "console-inbox.png") });
  const before = model.requests.length;
  await card.locator("input.feedback").fill("не трогай этот файл");
  await card.locator("button.reject").click();
  await card.waitFor({ state: "detached" });
  await page.locator("#inbox-status", { hasText: "Nothing waits for a decision." }).waitFor();
  const deadline = Date.now() + 10000;
  while (model.requests.length === before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  const last = model.requests.at(-1).messages;
  const tool = last.find((m) => m.role === "tool" && m.tool_call_id === "call_delete");
  assert.ok(tool?.content?.includes("не трогай этот файл"), `the model's next request: ${JSON.stringify(last)}`);
  assert.equal(readFileSync(join(project, "notes.txt"), "utf8"), "edited by a human\n");
});

test("switching the agent and cancelling a running turn show in the timeline", async () => {
  await page.goto(`${base}/console/#/session/${encodeURIComponent(sessionId)}`);
  await page.locator("#live", { hasText: "live" }).waitFor();
  await page.selectOption("#agent-select", "architect");
  await page.click("#switch");
  await page.locator("#timeline .item.switch", { hasText: "coder → architect: User requested agent switch" }).waitFor();
  model.script(text(Array.from({ length: 40 }, (_, i) => `x${i} `), { delayMs: 200 }));
  await page.fill("#message", "Спроектируй что-нибудь длинное");
  await page.click("#composer button[type=submit]");
  await page.waitForFunction(() => document.querySelectorAll('.item.assistant[data-state="streaming"] .token').length >= 2);
  await page.click("#cancel");
  await page.locator("#timeline .item.done", { hasText: "cancelled" }).waitFor();
  const { body } = await api(`/sessions/${sessionId}`);
  assert.deepEqual({ status: body.status, agent: body.current_agent }, { status: "idle", agent: "architect" });
});

test("a turn taken over after its server is killed drops the cut answer's void tokens and ends with the full answer", async () => {
  await page.goto(`${base}/console/#/session/${encodeURIComponent(sessionId)}`);
  await page.locator("#live", { hasText: "live" }).waitFor();
  const doneBefore = await page.locator("#timeline .item.done").count();
  const cut = Array.from({ length: 60 }, (_, i) => `v${i} `);
  model.script(text(cut, { delayMs: 200 }));
  await page.fill("#message", "Ответь длинно");
  await page.click("#composer button[type=submit]");
  // (The cancelled turn before left a streaming item of its own: count this answer's tokens.)
  await page.waitForFunction(() => [...document.querySelectorAll(".item.assistant .token")].filter((t) => /^v\d+ $/.test(t.textContent)).length >= 3);

  // The process dies mid-answer; a new one on the same database takes the turn over and asks the
  // model again; the page, reconnecting through the proxy with Last-Event-ID, follows it.
  const exited = new Promise((r) => server.once("exit", r));
  server.kill("SIGKILL");
  await exited;
  model.script(text(["Полный", " ответ."]));
  let direct;
  ({ child: server, base: direct } = await startServer());
  proxy.retarget(new URL(direct));
  await page.locator("#timeline .item.done").nth(doneBefore).waitFor({ timeout: 30000 });

  const items = await page.$$eval("#timeline > li", (lis) => lis.map((li) => [...li.children].map((c) => c.textContent).join(" | ")));
  assert.deepEqual(items.slice(-4), [
    "You | Ответь длинно",
    "Turn resumed | Another process continues the turn (its process stopped).",
    "Assistant (architect) | Полный ответ. | message complete",
    "Turn ended | completed · usage: 10 prompt + 2 completion tokens",
  ]);
  // The void tokens are gone from the page; what the store holds agrees with what it shows.
  const tokens = await page.$$eval("#timeline .token", (ts) => ts.map((t) => t.textContent));
  assert.deepEqual(tokens.filter((t) => /^v\d+ $/.test(t)), []);
  const events = await storedEvents(sessionId);
  const resumed = events.filter((e) => e.type === "turn_resumed");
  assert.equal(resumed.length, 1);
  assert.equal(resumed[0].reason, "owner_stopped");
  const voided = events.filter((e) => e.type === "assistant_message" && !e.is_final && e.seq > resumed[0].after_seq && e.seq < resumed[0].seq);
  assert.ok(voided.length >= 3 && voided.every((e) => e.token === cut[voided.indexOf(e)]), `void tokens stored: ${JSON.stringify(voided)}`);
  assert.equal((await api(`/sessions/${sessionId}`)).body.status, "idle");
});

test("a client-mode session is created and deleted from the list", async () => {
  await page.goto(`${base}/console/#/`);
  await page.fill("#new-user", "bob");
  await page.check("#mode-client");
  await page.click("#create-form button[type=submit]");
  await page.waitForURL(/#\/session\//);
  const id = decodeURIComponent(new URL(page.url()).hash.replace("#/session/", ""));
  assert.deepEqual((await api(`/sessions/${id}`)).body.metadata, { tool_execution: "client" });
  await page.goto(`${base}/console/#/`);
  const del = page.locator(`#sessions li[data-session-id="${id}"] button.danger`);
  await del.click();
  await page.locator(`#sessions li[data-session-id="${id}"] button.danger`, { hasText: "Confirm delete" }).waitFor();
  await page.locator(`#sessions li[data-session-id="${id}"] button.danger`).click();
  await page.locator(`#sessions li[data-session-id="${id}"]`).waitFor({ state: "detached" });
  assert.equal((await api(`/sessions/${id}`)).status, 404);
});

test("on a phone-sized screen the session fits one column", async () => {
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  try {
    await signIn(phone);
    await phone.locator("#nav").waitFor();
    await phone.goto(`${base}/console/#/session/${encodeURIComponent(sessionId)}`);
    await phone.locator("#timeline .item.done").first().waitFor();
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.equal(overflow, 0);
    await phone.evaluate(() => window.scrollTo(0, 0));
    await phone.screenshot({ path: join(SHOTS, "console-phone.png") });
  } finally {
    await phone.close();
  }
});

test("the page threw nothing and broke none of its content security policy", () => {
  assert.deepEqual(pageErrors, []);
});

// Unit tests of the SDK's queue, backoff and answer handling, with node's
// own test runner on the compiled module (npm test builds first).
import { test } from "node:test";
import assert from "node:assert/strict";

import { BoundedQueue, Client, judge, nextDelay, parseRetryAfter, traceparent, uuidv7 } from "../dist/venus.js";

/** A Storage in memory. */
class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
  removeItem(key) {
    this.map.delete(key);
  }
}

test("ids are UUIDv7: version 7, variant 10, time-ordered", () => {
  const a = uuidv7(1_700_000_000_000);
  const b = uuidv7(1_700_000_000_001);
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.ok(a < b);
  assert.equal(a.slice(0, 13), "018bcfe5-6800");
  assert.notEqual(uuidv7(), uuidv7());
});

test("a traceparent is version 00, 32 and 16 hex digits, sampled", () => {
  assert.match(traceparent(), /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
});

test("backoff doubles from one second to its cap, jittered, never under Retry-After", () => {
  const low = () => 0;
  const high = () => 0.999999;
  assert.equal(nextDelay(1, null, 60_000, low), 500);
  assert.ok(nextDelay(1, null, 60_000, high) < 1_000);
  assert.equal(nextDelay(3, null, 60_000, low), 2_000);
  assert.equal(nextDelay(20, null, 60_000, low), 30_000);
  assert.ok(nextDelay(20, null, 60_000, high) <= 60_000);
  assert.equal(nextDelay(1, 7, 60_000, low), 7_000);
  assert.equal(parseRetryAfter("3"), 3);
  assert.equal(parseRetryAfter(null), null);
  assert.equal(parseRetryAfter(new Date(10_000).toUTCString(), 5_000), 5);
  assert.equal(parseRetryAfter("soon"), null);
});

test("the queue is bounded, drops the oldest, and survives a new page through storage", () => {
  const storage = new MemoryStorage();
  const queue = new BoundedQueue(3, storage, "k");
  for (const id of ["a", "b", "c"]) assert.deepEqual(queue.push({ id }), []);
  assert.deepEqual(queue.push({ id: "d" }), [{ id: "a" }]);
  const again = new BoundedQueue(3, storage, "k");
  assert.deepEqual(again.all().map((e) => e.id), ["b", "c", "d"]);
  again.remove(["b", "d"]);
  assert.deepEqual(new BoundedQueue(3, storage, "k").all(), [{ id: "c" }]);
  again.remove(["c"]);
  assert.equal(storage.getItem("k"), null);
  // A batch by count and by bytes, at least one event.
  const big = new BoundedQueue(10, null, "x");
  for (let i = 0; i < 5; i++) big.push({ id: `e${i}`, pad: "x".repeat(100) });
  assert.equal(big.peek(3, 1_000_000).length, 3);
  assert.equal(big.peek(10, 200).length, 1);
  assert.equal(big.peek(10, 1).length, 1);
  // Garbage in storage is not a reason to fail.
  storage.setItem("bad", "{not json");
  assert.equal(new BoundedQueue(3, storage, "bad").length, 0);
});

test("answers are read per event: 0 done, 1004 again, 1001-1003 dropped, 401 stops", () => {
  const ids = ["a", "b", "c", "d"];
  const parts = [{ code: 0 }, { code: 1004 }, { code: 1001, data: "id is required" }, { code: 1003 }];
  const verdict = judge(ids, 206, { parts }, null);
  assert.deepEqual(verdict.done, ["a", "c", "d"]);
  assert.deepEqual(verdict.retry, ["b"]);
  assert.deepEqual(verdict.dropped.map((d) => d.id), ["c", "d"]);
  assert.equal(verdict.stop, false);
  assert.deepEqual(judge(ids, 503, { code: 2, parts: [] }, 5).retry, ids);
  assert.equal(judge(ids, 503, null, 5).retryAfter, 5);
  assert.deepEqual(judge(ids, 429, null, 1).retry, ids);
  assert.deepEqual(judge(ids, 0, null, null).retry, ids);
  const whole = judge(ids, 400, { code: 2, parts: [] }, null);
  assert.equal(whole.split, true);
  assert.deepEqual(whole.retry, ids);
  assert.deepEqual(judge(["a"], 413, null, null).done, ["a"]);
  assert.equal(judge(ids, 415, null, null).noGzip, true);
  // Fewer parts than events: matched by id.
  const byId = judge(["a", "b"], 206, { parts: [{ id: "b", code: 0 }] }, null);
  assert.deepEqual(byId.done, ["b"]);
  assert.deepEqual(byId.retry, ["a"]);
  for (const status of [401, 403]) {
    const stop = judge(ids, status, null, null);
    assert.equal(stop.stop, true);
    assert.deepEqual(stop.done, []);
  }
});

/** A fetch that answers from `replies` in turn and records the bodies. */
function fakeFetch(replies) {
  const calls = [];
  const fetch = async (url, init) => {
    // Gzip where the runtime has CompressionStream (node 18+ does).
    const stream = new Response(init.body).body;
    const plain =
      init.headers["Content-Encoding"] === "gzip" ? stream.pipeThrough(new DecompressionStream("gzip")) : stream;
    const body = JSON.parse(await new Response(plain).text());
    calls.push({ url, init, body });
    const reply = replies.shift() ?? { status: 200, parts: (ids) => ids.map(() => ({ code: 0 })) };
    const ids = body.data.map((e) => e.id);
    const parts = typeof reply.parts === "function" ? reply.parts(ids) : reply.parts;
    return new Response(JSON.stringify({ code: 0, data: "", parts: parts ?? [] }), {
      status: reply.status,
      headers: reply.retryAfter ? { "Retry-After": String(reply.retryAfter) } : {},
    });
  };
  return { fetch, calls };
}

function client(fetch, storage = new MemoryStorage()) {
  return new Client({
    endpoint: "http://gateway/api/v1/upload",
    appId: "app",
    category: "clicks",
    key: "k",
    fetch,
    storage,
    flushIntervalMs: 10,
    maxRetryDelayMs: 20,
  });
}

test("a 1004 is sent again with the same id; the rest are not", async () => {
  const { fetch, calls } = fakeFetch([
    { status: 206, parts: (ids) => ids.map((_, i) => ({ code: i === 1 ? 1004 : 0 })) },
  ]);
  const c = client(fetch);
  const ids = [c.track({ n: 0 }), c.track({ n: 1 }), c.track({ n: 2 })];
  await c.flush();
  assert.equal(calls.length, 2);
  assert.deepEqual(calls[0].body.data.map((e) => e.id), ids);
  assert.deepEqual(calls[1].body.data.map((e) => e.id), [ids[1]]);
  assert.equal(calls[0].init.headers["X-Venus-Key"], "k");
  assert.equal(calls[0].init.headers["Content-Encoding"], "gzip");
  assert.match(calls[0].init.headers.traceparent, /^00-/);
  assert.notEqual(calls[0].init.headers.traceparent, calls[1].init.headers.traceparent);
  assert.equal(c.queue.length, 0);
});

test("a 1001 is dropped after one request, with a warning", async () => {
  const warnings = [];
  const warn = console.warn;
  console.warn = (message) => warnings.push(message);
  try {
    const { fetch, calls } = fakeFetch([{ status: 400, parts: [{ code: 1001, data: "id is required" }] }]);
    const c = client(fetch);
    c.track({ bad: true });
    await c.flush();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(calls.length, 1);
    assert.equal(c.queue.length, 0);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0], /1001/);
  } finally {
    console.warn = warn;
  }
});

test("a 503 waits for Retry-After, then the batch goes again", async () => {
  const { fetch, calls } = fakeFetch([{ status: 503, parts: [], retryAfter: 1 }]);
  const c = client(fetch);
  c.track({ n: 1 });
  const started = Date.now();
  await c.flush();
  assert.equal(calls.length, 2);
  assert.ok(Date.now() - started >= 1_000, "Retry-After honoured");
  assert.deepEqual(calls[0].body.data, calls[1].body.data);
});

test("a 401 stops sending until the page reloads; the queue stays stored", async () => {
  const warn = console.warn;
  console.warn = () => {};
  try {
    const storage = new MemoryStorage();
    const { fetch, calls } = fakeFetch([{ status: 401, parts: [] }]);
    const c = client(fetch, storage);
    c.track({ n: 1 });
    await c.flush();
    c.track({ n: 2 });
    await c.flush();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(calls.length, 1);
    // Node has no sessionStorage: the tab is "page".
    assert.equal(JSON.parse(storage.getItem("venus:queue:app:clicks:page")).length, 2);
  } finally {
    console.warn = warn;
  }
});

test("a batch refused as a whole is split until the bad event is alone, then only it is dropped", async () => {
  const warn = console.warn;
  const warnings = [];
  console.warn = (m) => warnings.push(m);
  try {
    // The gateway refuses any batch holding the event with n = 2 (400, no parts).
    const calls = [];
    const fetch = async (url, init) => {
      const stream = new Response(init.body).body;
      const plain = init.headers["Content-Encoding"] === "gzip" ? stream.pipeThrough(new DecompressionStream("gzip")) : stream;
      const body = JSON.parse(await new Response(plain).text());
      calls.push(body.data.map((e) => e.n));
      if (body.data.some((e) => e.n === 2)) {
        return new Response(JSON.stringify({ code: 2, data: "too deep", parts: [] }), { status: 400 });
      }
      return new Response(JSON.stringify({ code: 0, parts: body.data.map(() => ({ code: 0 })) }), { status: 200 });
    };
    const c = client(fetch);
    for (let n = 0; n < 4; n++) c.track({ n });
    await c.flush();
    assert.equal(c.queue.length, 0);
    const sent = calls.filter((batch) => !batch.includes(2)).flat().sort();
    assert.deepEqual(sent, [0, 1, 3]);
    assert.equal(warnings.filter((w) => w.includes("dropped")).length, 1);
  } finally {
    console.warn = warn;
  }
});

test("a 415 turns gzip off and the batch goes again uncompressed", async () => {
  const encodings = [];
  const fetch = async (url, init) => {
    encodings.push(init.headers["Content-Encoding"] ?? "none");
    if (init.headers["Content-Encoding"] === "gzip") return new Response("{}", { status: 415 });
    const body = JSON.parse(await new Response(init.body).text());
    return new Response(JSON.stringify({ parts: body.data.map(() => ({ code: 0 })) }), { status: 200 });
  };
  const c = client(fetch);
  c.track({ n: 1 });
  await c.flush();
  assert.deepEqual(encodings, ["gzip", "none"]);
  assert.equal(c.queue.length, 0);
});

test("no answer (a network or CORS refusal) is retried; flush waits for the events it had", async () => {
  let failures = 2;
  const fetch = async (url, init) => {
    if (failures-- > 0) throw new TypeError("Failed to fetch");
    const stream = new Response(init.body).body.pipeThrough(new DecompressionStream("gzip"));
    const body = JSON.parse(await new Response(stream).text());
    return new Response(JSON.stringify({ parts: body.data.map(() => ({ code: 0 })) }), { status: 200 });
  };
  const c = client(fetch);
  c.track({ n: 1 });
  const flushed = c.flush();
  c.track({ n: 2 });
  await flushed;
  assert.equal(failures, -1);
  assert.ok(c.queue.length <= 1);
});

test("an event that is not JSON, or too large, is refused at track; storage that throws is no storage", () => {
  const warn = console.warn;
  console.warn = () => {};
  try {
    const c = client(async () => new Response("{}", { status: 200 }));
    const cycle = {};
    cycle.self = cycle;
    assert.equal(c.track(cycle), null);
    assert.equal(c.track({ big: "x".repeat(70_000) }), null);
    assert.equal(c.queue.length, 0);
    const throwing = {
      getItem() {
        throw new Error("SecurityError");
      },
      setItem() {
        throw new Error("QuotaExceededError");
      },
      removeItem() {
        throw new Error("SecurityError");
      },
    };
    const q = new BoundedQueue(5, throwing, "k", "venus:");
    q.push({ id: "a" });
    assert.equal(q.length, 1);
  } finally {
    console.warn = warn;
  }
});

test("a queue another tab left behind is taken over at start", () => {
  const storage = new MemoryStorage();
  storage.key = function (i) {
    return [...this.map.keys()][i] ?? null;
  };
  Object.defineProperty(storage, "length", { get() { return this.map.size; } });
  storage.setItem("venus:queue:app:clicks:other-tab", JSON.stringify([{ id: "left" }]));
  const q = new BoundedQueue(5, storage, "venus:queue:app:clicks:mine", "venus:queue:app:clicks:");
  assert.deepEqual(q.all().map((e) => e.id), ["left"]);
  assert.equal(storage.getItem("venus:queue:app:clicks:other-tab"), null);
  assert.equal(JSON.parse(storage.getItem("venus:queue:app:clicks:mine"))[0].id, "left");
});

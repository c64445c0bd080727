/**
 * The venus browser SDK: `init`, `track`, `flush`.
 *
 * It keeps the gateway's promises from the page on (docs/SDK.md):
 * - every event gets its `id` once, when tracked (a UUIDv7), and keeps it
 *   across every retry, so that a retried event is one row in the table;
 * - batches by count, bytes and time; gzip where `CompressionStream` exists;
 * - the answer is read per event: code 0 done; 1004, 429 and 503 retried
 *   with backoff and jitter, honouring `Retry-After`; 1001/1002/1003 and 400
 *   dropped with a console warning, never retried; 401/403 stop sending
 *   until the page reloads;
 * - a bounded queue in `localStorage` survives a reload; what is left when
 *   the page is hidden goes out with `sendBeacon` (the `text/plain` form,
 *   the key in `?key=`), and stays stored until a later page has it
 *   acknowledged;
 * - a `traceparent` per batch, so that the trace starts in the browser.
 *
 * One file with no imports: `dist/venus.js` is the ES module,
 * `dist/venus.iife.js` the script-tag build (`window.venus`).
 */

/** What `init` takes. */
export interface VenusOptions {
  /** The upload URL, e.g. `https://events.example.com/api/v1/upload`. */
  endpoint: string;
  /** `meta.app_id` of every batch. */
  appId: string;
  /** `meta.category` of every batch. */
  category: string;
  /** The app's write key, when the gateway runs `auth.mode: keys`. */
  key?: string;
  /** Most events in one batch (default 50). */
  maxBatchEvents?: number;
  /** Most bytes of one batch's JSON (default 60,000: under sendBeacon's 64 KiB). */
  maxBatchBytes?: number;
  /** A batch goes at most this long after its first event (default 2,000 ms). */
  flushIntervalMs?: number;
  /** Most events kept, in memory and in storage (default 1,000); past it the oldest go, with a warning. */
  maxQueueEvents?: number;
  /** The longest wait between retries (default 60,000 ms). */
  maxRetryDelayMs?: number;
  /** Where the queue is stored (default `localStorage`); `null` for none. */
  storage?: Storage | null;
  /** An upload with no answer after this long is given up and retried (default 30,000 ms). */
  requestTimeoutMs?: number;
  /** The fetch to use (tests). */
  fetch?: typeof fetch;
}

/** An event as queued: the caller's fields with its `id`. */
export type QueuedEvent = Record<string, unknown> & { id: string };

/** A UUIDv7: 48 bits of milliseconds, then random bits. */
export function uuidv7(now: number = Date.now(), random: Uint8Array = randomBytes(16)): string {
  const bytes = random.slice(0, 16);
  let ms = Math.floor(now);
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function randomBytes(n: number): Uint8Array {
  const bytes = new Uint8Array(n);
  globalThis.crypto.getRandomValues(bytes);
  return bytes;
}

/** A W3C `traceparent` for a new trace: one per batch. */
export function traceparent(random: Uint8Array = randomBytes(24)): string {
  const hex = Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
  return `00-${hex.slice(0, 32)}-${hex.slice(32, 48)}-01`;
}

/**
 * The wait before retry number `attempt` (1 for the first): exponential
 * from one second up to `maxMs`, with full jitter (a random share of it, so
 * that pages do not come back in step), and never shorter than the
 * gateway's `Retry-After`.
 */
export function nextDelay(
  attempt: number,
  retryAfterSeconds: number | null,
  maxMs: number = 60_000,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(maxMs, 1_000 * 2 ** Math.max(0, attempt - 1));
  const jittered = ceiling / 2 + random() * (ceiling / 2);
  // Retry-After is a floor; up to a tenth more keeps pages out of step.
  const floor =
    retryAfterSeconds !== null && retryAfterSeconds > 0 ? retryAfterSeconds * 1_000 * (1 + random() / 10) : 0;
  return Math.max(jittered, floor);
}

/** `Retry-After` in seconds (a number of seconds or an HTTP date). */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value === null) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - now) / 1_000);
}

/** UTF-8 bytes of `text`. */
export function utf8Length(text: string): number {
  return new TextEncoder().encode(text).length;
}

/** The page's storage, or `null` where reading it throws (sandboxed frames, blocked site data). */
function defaultStorage(): Storage | null {
  try {
    return typeof localStorage !== "undefined" ? localStorage : null;
  } catch {
    return null;
  }
}

/**
 * The queue: oldest first, at most `max` events, mirrored in `storage`
 * under `storageKey` after every change so that a reload finds it. Keys
 * under `prefix` that other tabs (or earlier pages) left are taken over at
 * start: their events are sent by this page (a copy a live tab also sends
 * has the same id, and the table makes it one row).
 */
export class BoundedQueue {
  private events: QueuedEvent[] = [];

  constructor(
    private readonly max: number,
    private readonly storage: Storage | null,
    private readonly storageKey: string,
    prefix?: string,
  ) {
    const seen = new Set<string>();
    const take = (key: string) => {
      for (const event of this.read(key)) {
        if (!seen.has(event.id)) {
          seen.add(event.id);
          this.events.push(event);
        }
      }
    };
    take(storageKey);
    if (storage && prefix) {
      try {
        const others: string[] = [];
        for (let i = 0; i < storage.length; i++) {
          const key = storage.key(i);
          if (key && key !== storageKey && key.startsWith(prefix)) others.push(key);
        }
        for (const key of others) {
          take(key);
          storage.removeItem(key);
        }
      } catch {
        // Storage that cannot be listed: this tab's own queue only.
      }
    }
    this.events = this.events.slice(-max);
    this.save();
  }

  private read(key: string): QueuedEvent[] {
    try {
      const stored = this.storage?.getItem(key);
      if (!stored) return [];
      const parsed = JSON.parse(stored);
      return Array.isArray(parsed) ? parsed.filter((e) => e && typeof e.id === "string") : [];
    } catch {
      // Unreadable storage or a broken stored queue: not a reason to fail.
      return [];
    }
  }

  get length(): number {
    return this.events.length;
  }

  /** Adds `event`; the oldest go when the queue is full (returned). */
  push(event: QueuedEvent): QueuedEvent[] {
    this.events.push(event);
    const dropped = this.events.length > this.max ? this.events.splice(0, this.events.length - this.max) : [];
    this.save();
    return dropped;
  }

  /** The oldest events, at most `count` and `bytes` of JSON (at least one). */
  peek(count: number, bytes: number): QueuedEvent[] {
    const batch: QueuedEvent[] = [];
    let size = 2;
    for (const event of this.events) {
      const length = utf8Length(JSON.stringify(event)) + 1;
      if (batch.length >= count || (batch.length > 0 && size + length > bytes)) break;
      batch.push(event);
      size += length;
    }
    return batch;
  }

  /** Whether any of `ids` is still queued. */
  holdsAny(ids: Set<string>): boolean {
    return this.events.some((e) => ids.has(e.id));
  }

  /** Removes the events with these ids (done, or dropped for good). */
  remove(ids: Iterable<string>): void {
    const gone = new Set(ids);
    if (gone.size === 0) return;
    this.events = this.events.filter((e) => !gone.has(e.id));
    this.save();
  }

  all(): QueuedEvent[] {
    return this.events.slice();
  }

  private save(): void {
    if (!this.storage) return;
    try {
      if (this.events.length === 0) this.storage.removeItem(this.storageKey);
      else this.storage.setItem(this.storageKey, JSON.stringify(this.events));
    } catch {
      // Storage full or refused: the stored copy may be older; a stale
      // copy only means events sent again later with their ids.
    }
  }
}

/** What one answer means for the events of its batch. */
export interface Verdict {
  /** Done (code 0) or never to be sent again (1001-1003, a single event refused as a whole). */
  done: string[];
  /** Dropped for good, with why: each is a console warning. */
  dropped: { id: string; why: string }[];
  /** To send again after a wait. */
  retry: string[];
  /** 401/403: stop sending until the page reloads. */
  stop: boolean;
  /** The batch was refused as a whole (400, 413 without parts): send fewer events at a time. */
  split: boolean;
  /** 415: the gateway (or a proxy) did not take the gzip body. */
  noGzip: boolean;
  /** The gateway's `Retry-After`, in seconds. */
  retryAfter: number | null;
}

type Part = { id?: string | null; code?: number; data?: string };

/**
 * Reads the gateway's answer to a batch (`ids` in the order sent). Parts
 * follow the order of the batch; when their number does not match, they
 * are matched by `id`. Pure: the unit tests feed it answers.
 */
export function judge(
  ids: string[],
  status: number,
  body: { parts?: Part[] } | null,
  retryAfter: number | null,
): Verdict {
  const verdict: Verdict = { done: [], dropped: [], retry: [], stop: false, split: false, noGzip: false, retryAfter };
  if (status === 401 || status === 403) {
    verdict.stop = true;
    verdict.retry = ids.slice();
    return verdict;
  }
  const parts = body && Array.isArray(body.parts) ? body.parts : [];
  if (parts.length > 0) {
    const byId = new Map(parts.filter((p) => typeof p.id === "string").map((p) => [p.id as string, p]));
    ids.forEach((id, i) => {
      const part = parts.length === ids.length ? parts[i] : byId.get(id);
      const code = part?.code;
      if (code === 0) verdict.done.push(id);
      else if (code === 1001 || code === 1002 || code === 1003) {
        verdict.done.push(id);
        verdict.dropped.push({ id, why: `code ${code}: ${part?.data ?? ""}` });
      } else verdict.retry.push(id);
    });
    return verdict;
  }
  if (status === 415) {
    verdict.noGzip = true;
    verdict.retry = ids.slice();
    return verdict;
  }
  if (status === 400 || status === 413) {
    // The batch was refused as a whole: one event of it may be the cause
    // (too deep, too large), or the gateway takes fewer events a batch.
    if (ids.length > 1) {
      verdict.split = true;
      verdict.retry = ids.slice();
    } else {
      verdict.done = ids.slice();
      verdict.dropped = ids.map((id) => ({ id, why: `HTTP ${status}` }));
    }
    return verdict;
  }
  // 429, 503, another status, no answer: all of it later.
  verdict.retry = ids.slice();
  return verdict;
}

/** One configured client. `init` makes the page's. */
export class Client {
  readonly queue: BoundedQueue;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private sending: Promise<void> | null = null;
  private attempt = 0;
  private notBefore = 0;
  private stopped = false;
  private gzip = typeof CompressionStream !== "undefined";
  /** Events a batch may have now: halved after a batch refused as a whole. */
  private batchLimit: number;
  /** Ids sent by beacon in this page (never beaconed twice). */
  private readonly beaconed = new Set<string>();
  private warnedFull = false;
  private readonly options: Required<Omit<VenusOptions, "key" | "storage" | "fetch">> & {
    key?: string;
    fetch: typeof fetch;
  };

  constructor(options: VenusOptions) {
    this.options = {
      maxBatchEvents: 50,
      maxBatchBytes: 60_000,
      flushIntervalMs: 2_000,
      maxQueueEvents: 1_000,
      maxRetryDelayMs: 60_000,
      requestTimeoutMs: 30_000,
      ...options,
      fetch: options.fetch ?? globalThis.fetch.bind(globalThis),
    };
    this.batchLimit = this.options.maxBatchEvents;
    const storage = options.storage === undefined ? defaultStorage() : options.storage;
    const prefix = `venus:queue:${options.appId}:${options.category}:`;
    this.queue = new BoundedQueue(this.options.maxQueueEvents, storage, prefix + tabId(), prefix);
    if (this.queue.length > 0) this.schedule(0);
    if (typeof addEventListener === "function") {
      addEventListener("pagehide", () => this.beacon());
      addEventListener("visibilitychange", () => {
        if (typeof document !== "undefined" && document.visibilityState === "hidden") this.beacon();
      });
    }
  }

  /**
   * Queues `event` with a new `id` (kept across every retry); returns the
   * id, or `null` (with a warning) for an event that cannot be sent: not
   * JSON (a cycle, a BigInt) or larger than a batch may be.
   */
  track(event: Record<string, unknown>): string | null {
    const queued = { ...event, id: uuidv7() };
    let size: number;
    try {
      size = utf8Length(JSON.stringify(queued));
    } catch (error) {
      console.warn(`venus: event not tracked, it is not JSON: ${error}`);
      return null;
    }
    if (size > this.options.maxBatchBytes) {
      console.warn(`venus: event not tracked, it is ${size} bytes (maxBatchBytes ${this.options.maxBatchBytes})`);
      return null;
    }
    const dropped = this.queue.push(queued);
    if (dropped.length > 0 && !this.warnedFull) {
      this.warnedFull = true;
      console.warn(`venus: the queue holds at most ${this.options.maxQueueEvents} events; the oldest are dropped`);
    }
    if (this.queue.length >= this.batchLimit) this.schedule(0);
    else this.schedule(this.options.flushIntervalMs);
    return queued.id;
  }

  /**
   * Sends what is queued now and resolves once each of those events is
   * sent or dropped (retrying as usual meanwhile), or the client stopped
   * (401/403).
   */
  async flush(): Promise<void> {
    const ids = new Set(this.queue.all().map((e) => e.id));
    while (!this.stopped && this.queue.holdsAny(ids)) {
      const wait = this.notBefore - Date.now();
      if (wait > 0) await sleep(wait);
      await this.sendOnce();
    }
  }

  private schedule(delay: number): void {
    if (this.stopped) return;
    const at = Math.max(delay, this.notBefore - Date.now());
    if (this.timer !== null) {
      if (delay > 0) return;
      clearTimeout(this.timer);
    }
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.sendOnce().then(() => {
        if (this.queue.length > 0) this.schedule(this.queue.length >= this.batchLimit ? 0 : this.options.flushIntervalMs);
      });
    }, Math.max(0, at));
  }

  /** One batch: sent, answered, judged. Never rejects. */
  private sendOnce(): Promise<void> {
    if (this.sending) return this.sending;
    this.sending = this.post()
      .catch((error) => {
        console.warn(`venus: sending failed: ${error}`);
        this.backOff(null);
      })
      .finally(() => {
        this.sending = null;
      });
    return this.sending;
  }

  private backOff(retryAfter: number | null): void {
    this.attempt += 1;
    this.notBefore = Date.now() + nextDelay(this.attempt, retryAfter, this.options.maxRetryDelayMs);
    this.schedule(this.notBefore - Date.now());
  }

  private async post(): Promise<void> {
    if (this.stopped || Date.now() < this.notBefore) return;
    const batch = this.queue.peek(this.batchLimit, this.options.maxBatchBytes);
    if (batch.length === 0) return;
    const ids = batch.map((e) => e.id);
    const json = JSON.stringify({
      meta: { app_id: this.options.appId, category: this.options.category },
      data: batch,
    });
    const headers: Record<string, string> = {
      "Content-Type": "application/json",
      traceparent: traceparent(),
    };
    if (this.options.key) headers["X-Venus-Key"] = this.options.key;
    let verdict: Verdict;
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), this.options.requestTimeoutMs);
    try {
      let body: BodyInit = json;
      if (this.gzip) {
        try {
          body = await new Response(new Blob([json]).stream().pipeThrough(new CompressionStream("gzip"))).blob();
          headers["Content-Encoding"] = "gzip";
        } catch {
          body = json;
        }
      }
      const response = await this.options.fetch(this.options.endpoint, {
        method: "POST",
        headers,
        body,
        signal: abort.signal,
      });
      let answer = null;
      try {
        answer = await response.json();
      } catch {
        // Not JSON (a proxy's page): judged by the status alone.
      }
      verdict = judge(ids, response.status, answer, parseRetryAfter(response.headers.get("Retry-After")));
    } catch {
      // No answer: refused by the network or CORS, or timed out.
      verdict = judge(ids, 0, null, null);
    } finally {
      clearTimeout(timeout);
    }
    for (const { id, why } of verdict.dropped) {
      console.warn(`venus: event ${id} dropped, not retried (${why})`);
    }
    this.queue.remove(verdict.done);
    if (verdict.stop) {
      this.stopped = true;
      console.warn("venus: the gateway refused the key or app (401/403); nothing more is sent until the page reloads");
      return;
    }
    if (verdict.noGzip && this.gzip) {
      // Sent again at once, uncompressed.
      this.gzip = false;
      this.schedule(0);
      return;
    }
    if (verdict.split) {
      this.batchLimit = Math.max(1, Math.floor(ids.length / 2));
      this.schedule(0);
      return;
    }
    if (verdict.retry.length > 0) {
      this.backOff(verdict.retryAfter);
    } else {
      this.attempt = 0;
      this.notBefore = 0;
      this.batchLimit = this.options.maxBatchEvents;
    }
  }

  /**
   * The page is going: what is queued and not beaconed yet goes with
   * `sendBeacon` (its answer cannot be read), at most one beacon quota
   * (64 KiB) a time; nothing while backing off after a 429/503. The events
   * stay stored: a later page of the site sends them again, and the
   * table's (app, id) identity makes the copies one row.
   */
  private beacon(): void {
    if (this.stopped || Date.now() < this.notBefore) return;
    if (typeof navigator === "undefined" || !navigator.sendBeacon) return;
    let url = this.options.endpoint;
    if (this.options.key) url += (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(this.options.key);
    const meta = JSON.stringify({ app_id: this.options.appId, category: this.options.category });
    const budget = Math.min(this.options.maxBatchBytes, 60_000);
    const batch: string[] = [];
    const ids: string[] = [];
    let size = utf8Length(meta) + 20;
    for (const event of this.queue.all()) {
      if (this.beaconed.has(event.id) || batch.length >= this.batchLimit) continue;
      const json = JSON.stringify(event);
      const length = utf8Length(json) + 1;
      if (size + length > budget) continue;
      batch.push(json);
      ids.push(event.id);
      size += length;
    }
    if (batch.length === 0) return;
    const body = new Blob([`{"meta":${meta},"data":[${batch.join(",")}]}`], { type: "text/plain" });
    if (navigator.sendBeacon(url, body)) {
      for (const id of ids) this.beaconed.add(id);
    }
  }
}

/** This tab's id: kept in `sessionStorage`, so that a reload keeps its queue key. */
function tabId(): string {
  try {
    const stored = sessionStorage.getItem("venus:tab");
    if (stored) return stored;
    const id = uuidv7();
    sessionStorage.setItem("venus:tab", id);
    return id;
  } catch {
    return "page";
  }
}

let client: Client | null = null;

/** Starts the page's client (once; a second call returns the first). */
export function init(options: VenusOptions): Client {
  if (!client) client = new Client(options);
  return client;
}

/** Queues an event; returns its `id` (`null` when it cannot be sent). */
export function track(event: Record<string, unknown>): string | null {
  if (!client) throw new Error("venus: call init() first");
  return client.track(event);
}

/** Sends what is queued now. */
export function flush(): Promise<void> {
  return client ? client.flush() : Promise.resolve();
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

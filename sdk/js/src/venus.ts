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
  const floor = retryAfterSeconds !== null && retryAfterSeconds > 0 ? retryAfterSeconds * 1_000 : 0;
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

/**
 * The queue: oldest first, at most `max` events, mirrored in `storage`
 * under `storageKey` after every change so that a reload finds it.
 */
export class BoundedQueue {
  private events: QueuedEvent[] = [];

  constructor(
    private readonly max: number,
    private readonly storage: Storage | null,
    private readonly storageKey: string,
  ) {
    const stored = storage?.getItem(storageKey);
    if (stored) {
      try {
        const parsed = JSON.parse(stored);
        if (Array.isArray(parsed)) {
          this.events = parsed.filter((e) => e && typeof e.id === "string").slice(-max);
        }
      } catch {
        // An unreadable stored queue is dropped, not a reason to fail.
      }
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
      const length = JSON.stringify(event).length + 1;
      if (batch.length >= count || (batch.length > 0 && size + length > bytes)) break;
      batch.push(event);
      size += length;
    }
    return batch;
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
      // Storage full or refused: the queue lives on in memory.
    }
  }
}

/** What one answer means for the events of its batch. */
export interface Verdict {
  /** Done (code 0) or never to be sent again (1001-1003, a 400). */
  done: string[];
  /** Dropped for good, with why: each is a console warning. */
  dropped: { id: string; why: string }[];
  /** To send again after a wait. */
  retry: string[];
  /** 401/403: stop sending until the page reloads. */
  stop: boolean;
  /** The gateway's `Retry-After`, in seconds. */
  retryAfter: number | null;
}

/**
 * Reads the gateway's answer to a batch (`ids` in the order sent). Pure:
 * the unit tests feed it answers.
 */
export function judge(
  ids: string[],
  status: number,
  body: { parts?: { id?: string | null; code?: number; data?: string }[] } | null,
  retryAfter: number | null,
): Verdict {
  const verdict: Verdict = { done: [], dropped: [], retry: [], stop: false, retryAfter };
  if (status === 401 || status === 403) {
    verdict.stop = true;
    verdict.retry = ids.slice();
    return verdict;
  }
  const parts = body && Array.isArray(body.parts) ? body.parts : [];
  if (parts.length === ids.length) {
    ids.forEach((id, i) => {
      const code = parts[i].code;
      if (code === 0) verdict.done.push(id);
      else if (code === 1001 || code === 1002 || code === 1003) {
        verdict.done.push(id);
        verdict.dropped.push({ id, why: `code ${code}: ${parts[i].data ?? ""}` });
      } else verdict.retry.push(id);
    });
    return verdict;
  }
  if (status === 400 || status === 413 || status === 415) {
    // The whole batch was refused for what it is: sending it again cannot help.
    for (const id of ids) {
      verdict.done.push(id);
      verdict.dropped.push({ id, why: `HTTP ${status}` });
    }
    return verdict;
  }
  // 429, 503, another 5xx, no answer: all of it later.
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
      ...options,
      fetch: options.fetch ?? globalThis.fetch.bind(globalThis),
    };
    const storage =
      options.storage === undefined ? (typeof localStorage !== "undefined" ? localStorage : null) : options.storage;
    this.queue = new BoundedQueue(
      this.options.maxQueueEvents,
      storage,
      `venus:queue:${options.appId}:${options.category}`,
    );
    if (this.queue.length > 0) this.schedule(0);
    if (typeof addEventListener === "function") {
      addEventListener("pagehide", () => this.beacon());
      addEventListener("visibilitychange", () => {
        if (typeof document !== "undefined" && document.visibilityState === "hidden") this.beacon();
      });
    }
  }

  /** Queues `event` with a new `id` (kept across every retry); returns the id. */
  track(event: Record<string, unknown>): string {
    const id = uuidv7();
    const dropped = this.queue.push({ ...event, id });
    if (dropped.length > 0) {
      console.warn(`venus: the queue holds at most ${this.options.maxQueueEvents} events; ${dropped.length} oldest dropped`);
    }
    if (this.queue.length >= this.options.maxBatchEvents) this.schedule(0);
    else this.schedule(this.options.flushIntervalMs);
    return id;
  }

  /** Sends what is queued now (waiting out a backoff in progress). */
  async flush(): Promise<void> {
    while (this.queue.length > 0 && !this.stopped) {
      const wait = this.notBefore - Date.now();
      if (wait > 0) await sleep(wait);
      const before = this.queue.length;
      await this.sendOnce();
      if (this.queue.length >= before && this.notBefore <= Date.now()) break;
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
        if (this.queue.length > 0) this.schedule(this.queue.length >= this.options.maxBatchEvents ? 0 : this.options.flushIntervalMs);
      });
    }, Math.max(0, at));
  }

  /** One batch: sent, answered, judged. */
  private sendOnce(): Promise<void> {
    if (this.sending) return this.sending;
    this.sending = this.post().finally(() => {
      this.sending = null;
    });
    return this.sending;
  }

  private async post(): Promise<void> {
    if (this.stopped || Date.now() < this.notBefore) return;
    const batch = this.queue.peek(this.options.maxBatchEvents, this.options.maxBatchBytes);
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
    let body: BodyInit = json;
    if (typeof CompressionStream !== "undefined") {
      body = await new Response(new Blob([json]).stream().pipeThrough(new CompressionStream("gzip"))).blob();
      headers["Content-Encoding"] = "gzip";
    }
    let verdict: Verdict;
    try {
      const response = await this.options.fetch(this.options.endpoint, { method: "POST", headers, body, keepalive: false });
      let answer = null;
      try {
        answer = await response.json();
      } catch {
        // Not JSON (a proxy's page): judged by the status alone.
      }
      verdict = judge(ids, response.status, answer, parseRetryAfter(response.headers.get("Retry-After")));
    } catch {
      verdict = judge(ids, 0, null, null);
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
    if (verdict.retry.length > 0) {
      this.attempt += 1;
      this.notBefore = Date.now() + nextDelay(this.attempt, verdict.retryAfter, this.options.maxRetryDelayMs);
      this.schedule(this.notBefore - Date.now());
    } else {
      this.attempt = 0;
      this.notBefore = 0;
    }
  }

  /**
   * The page is going: what is queued goes with `sendBeacon` (its answer
   * cannot be read), and stays stored: a later page of the site sends it
   * again, and the table's (app, id) identity makes the copies one row.
   */
  private beacon(): void {
    if (this.stopped || typeof navigator === "undefined" || !navigator.sendBeacon) return;
    let url = this.options.endpoint;
    if (this.options.key) url += (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(this.options.key);
    const events = this.queue.all();
    const meta = { app_id: this.options.appId, category: this.options.category };
    for (let start = 0; start < events.length; ) {
      const batch: QueuedEvent[] = [];
      let size = 64;
      while (start < events.length && batch.length < this.options.maxBatchEvents) {
        const length = JSON.stringify(events[start]).length + 1;
        if (batch.length > 0 && size + length > this.options.maxBatchBytes) break;
        batch.push(events[start]);
        size += length;
        start += 1;
      }
      const blob = new Blob([JSON.stringify({ meta, data: batch })], { type: "text/plain" });
      if (!navigator.sendBeacon(url, blob)) break;
    }
  }
}

let client: Client | null = null;

/** Starts the page's client (once; a second call replaces nothing). */
export function init(options: VenusOptions): Client {
  if (!client) client = new Client(options);
  return client;
}

/** Queues an event; returns its `id`. */
export function track(event: Record<string, unknown>): string {
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

// The server pushes what changes over GET /events (server-sent events). We read
// it with fetch() and a stream reader rather than EventSource, because
// EventSource cannot send the Authorization header, and parse the framing here.

import { ApiError, authorizedFetch, onKeyChange } from "./api.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;
// The server sends a keepalive comment every 15 s; after three missed ones the
// connection is taken for dead (a laptop that slept, a proxy that dropped it).
const SILENCE_MS = 45000;
// Only a stream that stayed open this long starts the backoff again: a server
// that is stopping may still say `ready` and then end every stream at once.
const STEADY_MS = 10000;

/**
 * Feed text chunks in, get `{type, data}` events out, as the SSE format
 * defines them: `field: value` lines, a blank line ends an event, lines that
 * start with `:` are comments, several `data:` lines join with newlines.
 */
export class SSEParser {
  constructor(dispatch) {
    this.dispatch = dispatch;
    this.buffer = "";
    this.skipLF = false;
    this.type = "";
    this.data = [];
  }

  push(chunk) {
    if (!chunk) return;
    // A "\r" ends a line at once; a "\n" right after it (perhaps in the next
    // chunk) belongs to the same line end.
    let text = this.skipLF && chunk.startsWith("\n") ? chunk.slice(1) : chunk;
    text = this.buffer + text;
    this.skipLF = text.endsWith("\r");
    const lines = text.split(/\r\n|\r|\n/);
    // The last piece has no line end yet ("" after a complete line).
    this.buffer = lines.pop();
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.dispatch(this.type || "message", this.data.join("\n"));
      this.type = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    // `id` and `retry` are not used by this server.
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/**
 * One connection to /events at a time, reconnected with backoff when it ends.
 *
 * `onEvent(type, data)` gets every event with its JSON data parsed; `ready`
 * comes first on each connection (the page refetches then, since events may
 * have been missed while it was away). `onStatus(status, text)` says how the
 * connection is: `connecting`, `live`, `retrying`, `forbidden`.
 */
export class LiveEvents {
  constructor({ onEvent, onStatus, onError }) {
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.onError = onError;
    this.stopped = false;
    this.wake = new AbortController();
    // A new key may open what the old one could not.
    onKeyChange(() => this.reconnectNow());
  }

  start() {
    this.loop();
  }

  /** Drop the current connection (or the wait before the next) and connect again. */
  reconnectNow() {
    this.delay = FIRST_DELAY_MS;
    this.wake.abort();
  }

  async loop() {
    this.delay = FIRST_DELAY_MS;
    while (!this.stopped) {
      this.wake = new AbortController();
      const signal = this.wake.signal;
      let waitForKey = false;
      try {
        this.onStatus("connecting", "connecting");
        const response = await authorizedFetch("/events", {
          headers: { Accept: "text/event-stream" },
          cache: "no-store",
          signal,
        });
        if (response.status === 403) {
          await response.body?.cancel();
          this.onStatus("forbidden", "no live updates: this key lacks the admin role");
          waitForKey = true;
        } else if (!response.ok) {
          const text = await response.text();
          let detail = `${response.status} ${response.statusText}`;
          try {
            detail = JSON.parse(text).detail ?? detail;
          } catch {
            // keep the status line
          }
          throw new ApiError(response.status, detail, "/events");
        } else {
          const opened = Date.now();
          await this.read(response.body, signal);
          if (Date.now() - opened >= STEADY_MS) this.delay = FIRST_DELAY_MS;
        }
      } catch (err) {
        if (signal.aborted) continue;
        if (err instanceof ApiError) this.onError(`Live updates: ${err.detail}`);
      }
      if (signal.aborted) continue;
      if (waitForKey) {
        // Nothing to retry until the key changes (reconnectNow wakes us).
        await new Promise((resolve) => signal.addEventListener("abort", resolve));
        continue;
      }
      const seconds = Math.round(this.delay / 100) / 10;
      this.onStatus("retrying", `reconnecting in ${seconds} s`);
      await sleep(this.delay, signal);
      this.delay = Math.min(this.delay * 2, MAX_DELAY_MS);
    }
  }

  async read(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser((type, text) => this.dispatch(type, text));
    let watchdog = null;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => this.wake.abort(), SILENCE_MS);
    };
    signal.addEventListener("abort", () => reader.cancel().catch(() => {}));
    try {
      arm();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        arm();
        parser.push(value);
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  dispatch(type, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      this.onError(`Live updates: the server sent an event that is not JSON (${type})`);
      return;
    }
    if (type === "ready") this.onStatus("live", "live");
    try {
      this.onEvent(type, data);
    } catch (err) {
      this.onError(`Could not show an update: ${err.message}`);
    }
  }
}

// Talking to the server: JSON requests, the API key, and errors people can read.
//
// The page is served from the server itself, so every URL is relative to the
// origin. A server without API keys answers every request; one with keys
// answers 401 until the page sends `Authorization: Bearer KEY`. On a 401 we ask
// for a key (see `onKeyNeeded`), keep it in sessionStorage (gone when the tab
// closes) and repeat the request.

const KEY_ITEM = "trio-taskworker-api-key";

// The server's root: the parent of the page's /ui/ folder, so that a reverse
// proxy that serves the server under a prefix still works.
const ROOT = new URL("../", document.baseURI);

/** The absolute URL of an API path such as `/runs`. */
export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), ROOT).href;
}

/** An answer other than 2xx: `status` and the server's `detail`. */
export class ApiError extends Error {
  constructor(status, detail, path) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.path = path;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  keyListeners.forEach((fn) => fn(null));
}

function storeKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
  keyListeners.forEach((fn) => fn(key));
}

const keyListeners = new Set();
/** Call `fn(key or null)` whenever the key is set or forgotten. */
export function onKeyChange(fn) {
  keyListeners.add(fn);
}

let askForKey = null;
/**
 * Register the function that asks the user for a key: called as
 * `ask({refused})` (refused: a key was sent and the server did not know it),
 * it returns a promise of the key typed in.
 */
export function onKeyNeeded(fn) {
  askForKey = fn;
}

// All requests that meet a 401 at the same time wait for the same answer.
let pendingKey = null;
function needKey(refusedKey) {
  if (!pendingKey) {
    pendingKey = askForKey({ refused: refusedKey !== null })
      .then((key) => {
        storeKey(key);
        return key;
      })
      .finally(() => {
        pendingKey = null;
      });
  }
  return pendingKey;
}

/** Headers for a request: the key, if there is one, and `extra`. */
export function authHeaders(extra = {}) {
  const key = storedKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/**
 * `fetch(path)` with the key, asking for one on a 401 and trying again. Returns
 * the Response of any other status; `init` is fetch's.
 */
export async function authorizedFetch(path, init = {}) {
  for (;;) {
    const sent = storedKey();
    const response = await fetch(apiUrl(path), { ...init, headers: authHeaders(init.headers) });
    if (response.status !== 401 || !askForKey) return response;
    // Another request may have stored a new key while this one was in flight.
    if (storedKey() !== sent) continue;
    await needKey(sent);
  }
}

async function detailOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`.trim() + (text ? `: ${text.slice(0, 300)}` : "");
}

/** A JSON request; resolves to the parsed body, rejects with an ApiError. */
export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await authorizedFetch(path, init);
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`, path);
  }
  if (!response.ok) {
    const detail = await detailOf(response);
    const error = new ApiError(response.status, detail, path);
    if (response.status === 403) {
      error.message =
        `The server refused this API key here: ${detail}. The dashboard needs a key ` +
        `with the admin role ("Forget API key" at the top right lets you give another).`;
    }
    throw error;
  }
  return response.json();
}

/** `path` with the query parameters of `params` that are set. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(name, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

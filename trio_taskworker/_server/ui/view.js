// What every page has in common: load from the API, then apply pushed events,
// without losing the ones that arrive while a load is in flight.

export class View {
  constructor(ctx) {
    this.ctx = ctx;
    this.alive = true;
    this.loading = false;
    this.loadSeq = 0;
    this.buffered = [];
    this.timers = [];
    this.pending = null;
  }

  /** Build the page's skeleton in `root` and load its data. */
  mount(root) {
    this.root = root;
    this.build(root);
    this.load();
  }

  unmount() {
    this.alive = false;
    this.timers.forEach(clearInterval);
    clearTimeout(this.pending);
  }

  /** Call `fn` every `ms` while the page is shown. */
  every(ms, fn) {
    this.timers.push(setInterval(fn, ms));
  }

  /** Load again (after a reconnect or a reset of the event stream). */
  refresh() {
    return this.load();
  }

  /** Load again in `ms`, once, however often this is called meanwhile. */
  loadSoon(ms) {
    if (this.pending !== null) return;
    this.pending = setTimeout(() => {
      this.pending = null;
      if (this.alive) this.load();
    }, ms);
  }

  /**
   * Fetch (`this.fetch()`), show (`this.show(data)`), then apply the events
   * that came meanwhile, in order. Events carry whole snapshots in the order
   * the server made them, so applying them after a snapshot that may already
   * include them ends in the server's latest state.
   */
  async load() {
    const seq = ++this.loadSeq;
    this.loading = true;
    this.buffered = [];
    let data;
    try {
      data = await this.fetch();
    } catch (err) {
      if (seq === this.loadSeq && this.alive) {
        this.loading = false;
        this.ctx.showError(err.message);
        this.failed?.(err);
      }
      return;
    }
    if (seq !== this.loadSeq || !this.alive) return;
    this.loading = false;
    this.show(data);
    const events = this.buffered;
    this.buffered = [];
    for (const [type, payload] of events) this.apply(type, payload);
  }

  onEvent(type, payload) {
    if (!this.alive) return;
    if (this.loading) this.buffered.push([type, payload]);
    else this.apply(type, payload);
  }

  /** Apply one pushed event (`run`, `workers`) to what is shown. */
  apply(_type, _payload) {}
}

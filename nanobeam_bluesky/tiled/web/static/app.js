// The live-maps page of `nanobeam serve` (nanobeam_bluesky/tiled/web): the derived runs in /derived
// and the ε/ω/χ maps of one of them, updated from Tiled's stream as its rows are written.
//
// Data: HTTP once (the run list, a run's start and data keys), then WebSockets on
// /api/v1/stream/single/<path> with JSON envelopes: the /derived container (new runs, stop
// documents) and the run's event table primary/internal from its first write (start=1). A lost
// connection is reopened from the last sequence number received; rows the stream no longer holds
// (a restarted server, an expired cache) are read once from the table. Every row lands in the cell
// its position (or raw seq_num) says, so a row received twice changes nothing.
"use strict";

(() => {
  // ------------------------------------------------------------------ where the API is
  // The page is at <root>/custom/live/ (or <root>/api/v1/live/); the API at <root>/api/v1.
  const ROOT = (() => {
    const path = location.pathname;
    const i = path.search(/\/(custom|api\/v1)\/live(\/|$)/);
    return i >= 0 ? path.slice(0, i) : "";
  })();
  const API = ROOT + "/api/v1";
  const WS_BASE = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + API + "/stream/single/";
  const KEY_STORAGE = "nanobeam.apiKey";
  const CATALOG = "derived";
  const RUN_LIST_LIMIT = 50;

  // The maps, in the order drawn (three per line); the flag map is categorical.
  const MAP_FIELDS = ["strain", "omega", "chi", "strain_err", "omega_err", "chi_err", "flag"];
  const SYMBOLS = { strain: "ε", omega: "ω", chi: "χ", thickness: "t" };
  const UNIT_NAMES = { um: "µm", micron: "µm", microns: "µm", deg: "deg", "1": "", Angstrom: "Å" };

  // viridis (matplotlib), 9 control points, interpolated to 256 entries.
  const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];
  const UNMEASURED = [255, 255, 255]; // not yet measured
  const NO_VALUE_RGB = [200, 200, 200]; // measured, no value (or flagged and hidden)
  const FLAG_OK_RGB = [214, 236, 217];
  const FLAG_PALETTE = ["#e41a1c", "#ff7f00", "#984ea3", "#377eb8", "#a65628", "#f781bf", "#999999",
    "#4daf4a", "#ffd92f", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#666666"];

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), message: $("message"), login: $("login"), key: $("key"), main: $("main"),
    runsBody: document.querySelector("#runs tbody"), follow: $("follow"), title: $("run-title"),
    info: $("run-info"), maps: $("maps"), legend: $("flag-legend"), tooltip: $("tooltip"),
    showFlagged: $("show-flagged"),
  };

  const state = {
    key: null,
    schema: { flag_bits: {}, no_value: 0, units: {} },
    runs: new Map(), // uid -> {start, stop}
    runsStream: null,
    view: null, // the RunView of the selected run
    follow: true,
    authFailed: false,
  };

  // ------------------------------------------------------------------ messages and status
  function setStatus(name, text) {
    el.status.dataset.state = name;
    el.status.textContent = text;
  }
  function showMessage(text) {
    el.message.textContent = text;
    el.message.hidden = false;
  }
  function clearMessage() {
    el.message.hidden = true;
    el.message.textContent = "";
  }
  // The status once a stream is (back) open: live, complete, or waiting for a run.
  function liveStatus() {
    const view = state.view;
    if (!view) setStatus("live", "waiting for a derived run…");
    else if (view.finished && view.complete()) setStatus("live", "complete");
    else setStatus("live", "live");
  }

  // ------------------------------------------------------------------ HTTP
  class HttpError extends Error {
    constructor(status, detail) {
      super(`HTTP ${status}${detail ? ": " + detail : ""}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function getJSON(path, params = {}) {
    const url = new URL(API + path, location.origin);
    for (const [name, value] of Object.entries(params)) {
      for (const v of Array.isArray(value) ? value : [value]) url.searchParams.append(name, v);
    }
    let response;
    try {
      response = await fetch(url, { headers: { Authorization: "Apikey " + state.key, Accept: "application/json" } });
    } catch (err) {
      throw new HttpError(0, "the server does not answer");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (err) { /* not JSON */ }
      if (response.status === 401 || response.status === 403) authFailed(`HTTP ${response.status}: ${detail}`);
      throw new HttpError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return response.json();
  }

  function nodePath(...segments) {
    return segments.map(encodeURIComponent).join("/");
  }

  // ------------------------------------------------------------------ the API key
  function authFailed(why) {
    if (state.authFailed) return;
    state.authFailed = true;
    sessionStorage.removeItem(KEY_STORAGE);
    stopAll();
    setStatus("error", "not connected");
    showMessage(
      `The server refused the API key (${why}).\n` +
      "Enter the key of `nanobeam serve`: it prints where the key is kept (the api_key file in its data directory).",
    );
    el.login.hidden = false;
    el.main.hidden = true;
    el.key.focus();
  }

  function keyFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const key = params.get("key");
    if (key !== null) {
      // Keep the key out of the address bar (and the history): the tab's sessionStorage holds it.
      sessionStorage.setItem(KEY_STORAGE, key.trim());
      params.delete("key");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    return { run: params.get("run") };
  }

  // ------------------------------------------------------------------ streams
  // One node's stream: tiled's JSON envelopes, first-message authentication (a browser cannot
  // set headers on a WebSocket), reopened after a loss from the last sequence received.
  class Stream {
    constructor(path, handlers, start = null) {
      this.path = path;
      this.handlers = handlers;
      this.start = start;
      this.lastSequence = null;
      this.closed = false;
      this.attempts = 0;
      this.ws = null;
      this.timer = null;
    }

    open() {
      if (this.closed) return this;
      const query = new URLSearchParams({ envelope_format: "json" });
      const from = this.lastSequence !== null ? this.lastSequence + 1 : this.start;
      if (from !== null) query.set("start", String(from));
      const ws = new WebSocket(WS_BASE + this.path + "?" + query);
      const resumed = this.lastSequence !== null;
      let schema = null;
      this.ws = ws;
      ws.onopen = () => ws.send(JSON.stringify({ type: "auth", api_key: state.key }));
      ws.onmessage = (event) => {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch (err) {
          return;
        }
        if (schema === null) { // the first message describes the node
          schema = msg;
          this.attempts = 0;
          if (this.handlers.open) this.handlers.open(msg, resumed);
          return;
        }
        if (typeof msg.sequence === "number") {
          // Numbers that start again: the server lost its stream cache (an in-memory store
          // restarted); what was written meanwhile is read from the catalog.
          if (this.lastSequence !== null && msg.sequence <= this.lastSequence && this.handlers.reset) {
            this.handlers.reset();
          }
          this.lastSequence = msg.sequence;
        }
        this.handlers.message(msg, Date.now());
      };
      ws.onclose = (event) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (this.closed) return;
        if (event.code === 1000) { // "Producer ended stream": the writer closed this node
          this.closed = true;
          if (this.handlers.end) this.handlers.end(event.reason);
          return;
        }
        if (event.code === 4001 || event.code === 4003) {
          this.closed = true;
          authFailed(`the stream answered ${event.code}: ${event.reason || "authentication failed"}`);
          return;
        }
        this.attempts += 1;
        const delay = Math.min(500 * 2 ** (this.attempts - 1), 5000);
        if (this.handlers.lost) this.handlers.lost(event.code, event.reason, delay);
        this.timer = setTimeout(() => this.open(), delay);
      };
      return this;
    }

    close() {
      this.closed = true;
      clearTimeout(this.timer);
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        ws.close(1000);
      }
    }
  }

  function describeLoss(code, reason, delay) {
    const seconds = (delay / 1000).toFixed(1);
    if (code === 1012 && /subscription lost/i.test(reason || "")) { // tiled: its Redis went away
      return `The server lost its live feed (${reason}: its Redis?). Reconnecting in ${seconds} s; ` +
        "the maps keep what they have, missing rows are read when it is back.";
    }
    if (code === 1012 || code === 1001) {
      return `The server is shutting down or restarting. Reconnecting in ${seconds} s; ` +
        "the maps keep what they have and resume where they left off.";
    }
    if (code === 1006) {
      return `The server at ${location.host} does not answer. Reconnecting in ${seconds} s; ` +
        "the maps keep what they have and resume where they left off.";
    }
    return `The live stream closed (${code}${reason ? ": " + reason : ""}). Reconnecting in ${seconds} s.`;
  }

  // A stream that cannot connect (1006) may be a server that is down, or one that answers but
  // whose stream cache (Redis) is gone: ask its health endpoint and say which.
  function showLoss(code, reason, delay) {
    showMessage(describeLoss(code, reason, delay));
    if (code !== 1006) return;
    fetch("/healthz", { cache: "no-store" })
      .then((response) => {
        if (!response.ok) return;
        const seconds = (delay / 1000).toFixed(1);
        showMessage(
          `The server answers, but its live stream does not (its stream cache, e.g. Redis, may be down). ` +
            `Reconnecting in ${seconds} s; the maps keep what they have, missing rows are read when it is back.`,
        );
      })
      .catch(() => {}); // down indeed: the message above stands
  }

  // ------------------------------------------------------------------ formatting
  function unitName(units) {
    if (units === undefined || units === null) return "";
    return Object.prototype.hasOwnProperty.call(UNIT_NAMES, units) ? UNIT_NAMES[units] : String(units);
  }
  function fmt(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "—";
    const a = Math.abs(value);
    if (a !== 0 && (a < 1e-2 || a >= 1e4)) return value.toExponential(3);
    return value.toPrecision(4);
  }
  function fmtTime(epochSeconds) {
    if (!Number.isFinite(epochSeconds)) return "";
    const d = new Date(epochSeconds * 1000);
    const today = new Date();
    const time = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === today.toDateString() ? time : d.toLocaleDateString() + " " + time;
  }
  function flagNames(value) {
    if (!value) return "none";
    const names = Object.entries(state.schema.flag_bits).filter(([, bit]) => value & bit).map(([n]) => n);
    return names.join(", ") || String(value);
  }
  function rint(x) { // numpy's rint: halves to even
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }
  function hexRGB(hex) {
    return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }
  const LUT = (() => {
    const stops = VIRIDIS.map(hexRGB);
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = (i / 255) * (stops.length - 1);
      const k = Math.min(Math.floor(t), stops.length - 2);
      const f = t - k;
      for (let c = 0; c < 3; c++) lut[3 * i + c] = stops[k][c] + f * (stops[k + 1][c] - stops[k][c]);
    }
    return lut;
  })();

  // ------------------------------------------------------------------ where a row goes
  // As nanobeam_bluesky.callbacks.MapGrid: from the start's shape and extents and the positions
  // named by hints.dimensions; without extents, raster order by raw seq_num (snaking honoured);
  // without a shape, one column per distinct x and one row per distinct y seen so far.
  class MapGrid {
    constructor(start) {
      const dims = ((start.hints || {}).dimensions || []).filter((d) => Array.isArray(d) && d.length === 2 && d[1] === "primary");
      this.keys = dims.map((d) => (typeof d[0] === "string" ? d[0] : d[0][0]));
      if (this.keys.length !== 2) this.keys = null;
      const shape = start.shape;
      this.extents = null;
      this.snake = Array.isArray(start.snaking) && start.snaking.length === 2 && Boolean(start.snaking[1]);
      if (Array.isArray(shape) && shape.length === 2 && shape[0] >= 1 && shape[1] >= 1) {
        this.shape = [Number(shape[0]), Number(shape[1])];
        const ext = start.extents;
        if (this.keys && Array.isArray(ext) && ext.length === 2) this.extents = ext.map((e) => [Number(e[0]), Number(e[1])]);
        this.mode = this.extents ? "positions" : "raster";
      } else {
        this.mode = "distinct";
        this.values = [[], []]; // distinct y, distinct x (sorted)
        this.shape = [1, 1];
      }
    }

    // (row, col) of a row, or null when it falls outside the map.
    cell(row) {
      const [ny, nx] = this.shape;
      if (this.mode === "positions" && this.keys.every((k) => Number.isFinite(row[k]))) {
        const idx = [0, 1].map((axis) => {
          const [lo, hi] = this.extents[axis];
          const n = this.shape[axis];
          const i = hi !== lo ? rint(((row[this.keys[axis]] - lo) / (hi - lo)) * (n - 1)) : 0;
          return i >= 0 && i < n ? i : -1;
        });
        return idx[0] >= 0 && idx[1] >= 0 ? idx : null;
      }
      if (this.mode === "distinct" && this.keys && this.keys.every((k) => Number.isFinite(row[k]))) {
        const idx = [0, 1].map((axis) => this.values[axis].indexOf(this.quantise(row[this.keys[axis]])));
        return idx[0] >= 0 && idx[1] >= 0 ? idx : null;
      }
      const flat = Number(row.raw_seq_num ?? row.seq_num) - 1;
      if (!(flat >= 0)) return null;
      if (this.mode === "distinct") return [0, flat]; // no positions: one line, in order
      const r = Math.floor(flat / nx);
      let c = flat % nx;
      if (this.snake && r % 2 === 1) c = nx - 1 - c;
      return r < ny ? [r, c] : null;
    }

    quantise(v) {
      return Math.round(v * 1e4) / 1e4;
    }

    // Without a shape the grid grows with the rows: true when it changed (cells move).
    grow(rows) {
      if (this.mode !== "distinct") return false;
      let changed = false;
      if (!this.keys) {
        const n = Math.max(this.shape[1], ...rows.map((r) => Number(r.raw_seq_num ?? r.seq_num) || 0));
        changed = n !== this.shape[1];
        this.shape = [1, n];
        return changed;
      }
      for (const row of rows) {
        for (const axis of [0, 1]) {
          const v = row[this.keys[axis]];
          if (!Number.isFinite(v)) continue;
          const q = this.quantise(v);
          if (!this.values[axis].includes(q)) {
            this.values[axis].push(q);
            this.values[axis].sort((a, b) => a - b);
            changed = true;
          }
        }
      }
      this.shape = [Math.max(1, this.values[0].length), Math.max(1, this.values[1].length)];
      return changed;
    }

    // The grid position of a cell, in the positions' units (for cells not yet measured).
    position(r, c) {
      if (this.mode === "positions") {
        return [0, 1].map((axis) => {
          const [lo, hi] = this.extents[axis];
          const n = this.shape[axis];
          return n > 1 ? lo + ((axis === 0 ? r : c) * (hi - lo)) / (n - 1) : lo;
        });
      }
      if (this.mode === "distinct" && this.keys) return [this.values[0][r], this.values[1][c]];
      return [NaN, NaN];
    }
  }

  // ------------------------------------------------------------------ one run's maps
  class RunView {
    constructor(uid) {
      this.uid = uid;
      this.start = null;
      this.stop = null;
      this.dataKeys = {};
      this.grid = null;
      this.fields = [];
      this.maps = {}; // field -> Float32Array(ny*nx) (flag: Uint16Array)
      this.cellSeq = null; // Int32Array: the derived seq_num in each cell (0: not measured)
      this.cellPos = null; // Float64Array(2 * ny*nx): the row's own (y, x)
      this.rows = []; // kept only for a grid that grows (no shape)
      this.filled = 0;
      this.seen = new Uint8Array(1024); // derived seq_nums received (for gaps)
      this.received = 0;
      this.maxSeq = 0;
      this.arrivals = []; // [seq_num, frame time (s), written (ms), arrived (ms)]
      this.streams = [];
      this.finished = false;
      this.catchingUp = null;
      this.checkTimer = null;
      this.drawPending = false;
      this.figures = {};
      this.closed = false;
    }

    async load() {
      const node = await getJSON("/metadata/" + nodePath(CATALOG, this.uid));
      const md = node.data.attributes.metadata || {};
      this.start = md.start || {};
      this.stop = md.stop || null;
      state.runs.set(this.uid, { start: this.start, stop: this.stop });
      this.grid = new MapGrid(this.start);
      this.allocate();
      this.renderHeader();
      this.buildFigures();
      await this.followTable();
    }

    allocate() {
      const n = this.grid.shape[0] * this.grid.shape[1];
      this.maps = {};
      for (const f of MAP_FIELDS) this.maps[f] = f === "flag" ? new Uint16Array(n) : new Float32Array(n).fill(NaN);
      this.cellSeq = new Int32Array(n);
      this.cellPos = new Float64Array(2 * n).fill(NaN);
      this.filled = 0;
    }

    // Subscribe to the event table once it exists: the run's stream says when "primary" is
    // created, the stream container's when its table "internal" is.
    async followTable() {
      const runPath = [CATALOG, this.uid];
      const exists = async (...segments) => {
        try {
          return await getJSON("/metadata/" + nodePath(...segments));
        } catch (err) {
          if (err.status === 404) return null;
          throw err;
        }
      };
      if (!(await exists(...runPath, "primary"))) await this.childCreated(runPath, "primary");
      if (this.closed) return;
      const primary = await exists(...runPath, "primary");
      this.dataKeys = (primary && primary.data.attributes.metadata.data_keys) || {};
      if (!(await exists(...runPath, "primary", "internal"))) {
        await this.childCreated([...runPath, "primary"], "internal");
        if (this.closed) return;
        if (!(await exists(...runPath, "primary", "internal"))) { // the run ended without rows
          setStatus("live", "complete");
          this.finished = true;
          this.renderHeader();
          return;
        }
      }
      if (!Object.keys(this.dataKeys).length) {
        const again = await exists(...runPath, "primary");
        this.dataKeys = (again && again.data.attributes.metadata.data_keys) || {};
      }
      this.buildFigures();
      const table = new Stream(nodePath(...runPath, "primary", "internal"), {
        open: (schema, resumed) => {
          liveStatus();
          clearMessage();
          // Rows the stream no longer holds are read from the table (once).
          this.scheduleCheck(resumed ? 300 : 1500);
        },
        message: (msg, arrived) => this.onTableMessage(msg, arrived),
        reset: () => this.scheduleCheck(300, true),
        end: () => {
          this.finished = true;
          this.scheduleCheck(0);
        },
        lost: (code, reason, delay) => {
          setStatus("reconnecting", "reconnecting…");
          showLoss(code, reason, delay);
        },
      }, 1);
      this.streams.push(table.open());
    }

    childCreated(segments, key) {
      return new Promise((resolve) => {
        const stream = new Stream(nodePath(...segments), {
          message: (msg) => {
            if (msg.type === "container-child-created" && msg.key === key) {
              stream.close();
              resolve();
            }
          },
          end: () => resolve(),
          lost: (code, reason, delay) => showLoss(code, reason, delay),
        }, 1);
        this.streams.push(stream.open());
        setStatus("waiting", `waiting for the run's ${key === "internal" ? "first rows" : "stream"}…`);
      });
    }

    onTableMessage(msg, arrived) {
      if (msg.type !== "table-data" || !msg.payload) return;
      const written = Date.parse(msg.timestamp);
      const rows = this.addColumns(msg.payload);
      for (const row of rows) {
        if (this.arrivals.length < 200000) this.arrivals.push([row.seq_num, row.time, written, arrived]);
      }
      if (this.maxSeq > this.received) this.scheduleCheck(1000);
    }

    // Columns {name: [values]} (a stream payload or a table read) into the maps.
    addColumns(columns) {
      const names = Object.keys(columns);
      const n = names.length ? columns[names[0]].length : 0;
      const rows = [];
      for (let i = 0; i < n; i++) {
        const row = {};
        for (const name of names) row[name] = columns[name][i];
        rows.push(row);
      }
      if (this.grid.mode === "distinct") {
        this.rows.push(...rows);
        if (this.grid.grow(rows)) {
          this.allocate();
          for (const row of this.rows) this.place(row);
          this.buildFigures();
          this.requestDraw();
          return rows;
        }
      }
      for (const row of rows) this.place(row);
      this.requestDraw();
      return rows;
    }

    place(row) {
      const seq = Number(row.seq_num);
      if (seq > 0) {
        if (seq >= this.seen.length) {
          const grown = new Uint8Array(Math.max(2 * this.seen.length, seq + 1));
          grown.set(this.seen);
          this.seen = grown;
        }
        if (!this.seen[seq]) {
          this.seen[seq] = 1;
          this.received += 1;
        }
        this.maxSeq = Math.max(this.maxSeq, seq);
      }
      const cell = this.grid.cell(row);
      if (!cell) return;
      const i = cell[0] * this.grid.shape[1] + cell[1];
      if (!this.cellSeq[i]) this.filled += 1;
      this.cellSeq[i] = seq > 0 ? seq : -1;
      for (const f of MAP_FIELDS) {
        const v = row[f];
        if (f === "flag") this.maps.flag[i] = Number(v) || 0;
        else this.maps[f][i] = v === null || v === undefined ? NaN : v;
      }
      if (this.grid.keys) {
        this.cellPos[2 * i] = row[this.grid.keys[0]] ?? NaN;
        this.cellPos[2 * i + 1] = row[this.grid.keys[1]] ?? NaN;
      }
    }

    expectedRows() {
      const events = this.stop && this.stop.num_events;
      return events && Number.isFinite(events.primary) ? events.primary : null;
    }

    complete() {
      const expected = this.expectedRows();
      return this.received >= this.maxSeq && (expected === null || this.received >= expected);
    }

    scheduleCheck(delay, force = false) {
      clearTimeout(this.checkTimer);
      this.checkTimer = setTimeout(() => this.check(force), delay);
    }

    // Rows missing (a gap in seq_num, fewer than the stop document counts, a stream store
    // that lost them): read the table once and place every row (placing is idempotent).
    async check(force) {
      if (this.closed || this.catchingUp) return;
      const expected = this.expectedRows();
      const missing = this.received < this.maxSeq || (expected !== null && this.received < expected);
      if (missing || force) {
        this.catchingUp = this.readTable().finally(() => (this.catchingUp = null));
        await this.catchingUp;
      }
      if (this.stop && this.complete()) this.finished = true; // also when the stream no longer holds its end
      this.renderHeader();
      if (this.finished && this.complete() && state.view === this) liveStatus();
    }

    async readTable() {
      try {
        const columns = await getJSON("/table/full/" + nodePath(CATALOG, this.uid, "primary", "internal"), {
          format: "application/json",
        });
        this.addColumns(columns);
      } catch (err) {
        if (err.status === 404) return; // no table yet
        if (err.status !== 401 && err.status !== 403) showMessage(`Could not read the run's table (${err.message}); the maps show what the stream delivered.`);
      }
    }

    setStop(stop) {
      this.stop = stop;
      this.scheduleCheck(500);
      this.renderHeader();
    }

    close() {
      this.closed = true;
      clearTimeout(this.checkTimer);
      for (const s of this.streams) s.close();
      this.streams = [];
    }

    // ---------------------------------------------------------------- drawing
    renderHeader() {
      const s = this.start || {};
      const scan = s.parent_scan_id ? `scan ${s.parent_scan_id}` : "derived run";
      el.title.textContent = `${scan}${s.sample ? " · " + s.sample : ""}`;
      const [ny, nx] = this.grid ? this.grid.shape : [0, 0];
      const expected = this.expectedRows();
      const parts = [
        `run ${this.uid.slice(0, 8)} of raw run ${(s.parent_uid || "?").slice(0, 8)}`,
        `started ${fmtTime(s.time)}`,
        `${ny} × ${nx} map`,
        `${this.received}${expected !== null ? " / " + expected : ""} rows`,
        this.stop ? `stopped: ${this.stop.exit_status}` : "running",
      ];
      const model = (s.nanobeam || {}).model_id;
      if (model) parts.push(`model ${model}`);
      el.info.textContent = parts.join(" · ");
      renderRunList();
    }

    axisLabels() {
      if (!this.grid.keys) return ["row", "column"];
      return this.grid.keys.map((k) => {
        const unit = unitName((this.dataKeys[k] || {}).units);
        return unit ? `${k} (${unit})` : k;
      });
    }

    buildFigures() {
      el.maps.textContent = "";
      this.figures = {};
      const [ny, nx] = this.grid.shape;
      const [yLabel, xLabel] = this.axisLabels();
      let aspect = nx / ny;
      if (this.grid.mode === "positions") {
        const dy = Math.abs(this.grid.extents[0][1] - this.grid.extents[0][0]) / Math.max(ny - 1, 1);
        const dx = Math.abs(this.grid.extents[1][1] - this.grid.extents[1][0]) / Math.max(nx - 1, 1);
        if (dx > 0 && dy > 0) aspect = (nx * dx) / (ny * dy);
      }
      for (const f of MAP_FIELDS) {
        const figure = document.createElement("figure");
        figure.className = "map";
        figure.dataset.field = f;
        const caption = document.createElement("figcaption");
        caption.textContent = this.title(f);
        const plot = document.createElement("div");
        plot.className = "plot";
        const canvas = document.createElement("canvas");
        canvas.className = "cells";
        canvas.width = nx;
        canvas.height = ny;
        canvas.style.aspectRatio = String(aspect);
        canvas.addEventListener("mousemove", (event) => this.hover(event, canvas));
        canvas.addEventListener("mouseleave", () => (el.tooltip.hidden = true));
        plot.append(canvas);
        const entry = { canvas, ticks: null };
        if (f !== "flag") {
          const bar = document.createElement("div");
          bar.className = "colorbar";
          // A div, not a canvas: it takes the height of the map beside it.
          const gradient = document.createElement("div");
          gradient.className = "bar";
          gradient.style.background = `linear-gradient(to top, ${VIRIDIS.join(", ")})`;
          const ticks = document.createElement("div");
          ticks.className = "ticks";
          for (let i = 0; i < 3; i++) ticks.append(document.createElement("span"));
          bar.append(gradient, ticks);
          plot.append(bar);
          entry.ticks = ticks;
        }
        const axes = document.createElement("div");
        axes.className = "axes";
        axes.textContent = `→ ${xLabel}, ↓ ${yLabel}`;
        figure.append(caption, plot, axes);
        el.maps.append(figure);
        this.figures[f] = entry;
      }
      this.requestDraw();
    }

    title(field) {
      if (field === "flag") return "quality flags";
      const base = field.replace(/_(err|std)$/, "");
      const what = field.endsWith("_err") ? " expected error" : field.endsWith("_std") ? " ensemble std" : "";
      const key = this.dataKeys[field] || this.dataKeys[base] || {};
      const unit = unitName(key.units ?? state.schema.units[base]);
      return `${SYMBOLS[base] || base}${base === "strain" && !what ? " (strain)" : ""}${what}${unit ? " (" + unit + ")" : ""}`;
    }

    requestDraw() {
      if (this.drawPending) return;
      this.drawPending = true;
      requestAnimationFrame(() => {
        this.drawPending = false;
        if (!this.closed) this.draw();
      });
    }

    draw() {
      const [ny, nx] = this.grid.shape;
      const n = ny * nx;
      const showFlagged = el.showFlagged.checked;
      const flags = this.maps.flag;
      const present = new Map();
      for (const f of MAP_FIELDS) {
        const entry = this.figures[f];
        if (!entry) continue;
        const ctx = entry.canvas.getContext("2d");
        const image = ctx.createImageData(nx, ny);
        const data = image.data;
        if (f === "flag") {
          for (let i = 0; i < n; i++) {
            let rgb = UNMEASURED;
            if (this.cellSeq[i]) {
              const v = flags[i];
              if (v === 0) rgb = FLAG_OK_RGB;
              else {
                const top = 31 - Math.clz32(v);
                rgb = hexRGB(FLAG_PALETTE[top % FLAG_PALETTE.length]);
                for (let b = 0; b < 16; b++) if (v & (1 << b)) present.set(b, (present.get(b) || 0) + 1);
              }
            }
            data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
          }
        } else {
          const values = this.maps[f];
          // Flagged points are grey unless asked for (as in the matplotlib live maps).
          const shown = (i) => this.cellSeq[i] && Number.isFinite(values[i]) && (showFlagged || flags[i] === 0);
          let lo = Infinity;
          let hi = -Infinity;
          for (let i = 0; i < n; i++) {
            if (!shown(i)) continue;
            if (values[i] < lo) lo = values[i];
            if (values[i] > hi) hi = values[i];
          }
          const span = hi > lo ? hi - lo : 1;
          for (let i = 0; i < n; i++) {
            let rgb;
            if (!this.cellSeq[i]) rgb = UNMEASURED;
            else if (!shown(i)) rgb = NO_VALUE_RGB;
            else {
              const k = Math.max(0, Math.min(255, Math.round(((values[i] - lo) / span) * 255)));
              rgb = [LUT[3 * k], LUT[3 * k + 1], LUT[3 * k + 2]];
            }
            data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
          }
          const spans = entry.ticks.children;
          const finite = Number.isFinite(lo);
          spans[0].textContent = finite ? fmt(hi) : "";
          spans[1].textContent = finite ? fmt((lo + hi) / 2) : "";
          spans[2].textContent = finite ? fmt(lo) : "";
        }
        ctx.putImageData(image, 0, 0);
      }
      this.renderLegend(present);
      this.renderHeader(); // the row counts
    }

    renderLegend(present) {
      el.legend.textContent = "";
      const add = (rgb, text) => {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = `rgb(${rgb.join(",")})`;
        el.legend.append(swatch, document.createTextNode(text));
      };
      add(UNMEASURED, "not measured yet");
      add(NO_VALUE_RGB, el.showFlagged.checked ? "no value" : "no value or flagged");
      add(FLAG_OK_RGB, "flag 0 (none)");
      const names = Object.entries(state.schema.flag_bits);
      for (const [bit, count] of [...present.entries()].sort((a, b) => a[0] - b[0])) {
        const name = (names.find(([, v]) => v === 1 << bit) || [String(1 << bit)])[0];
        add(hexRGB(FLAG_PALETTE[bit % FLAG_PALETTE.length]), `${name} (${count})`);
      }
    }

    hover(event, canvas) {
      const rect = canvas.getBoundingClientRect();
      const [ny, nx] = this.grid.shape;
      const c = Math.floor(((event.clientX - rect.left) / rect.width) * nx);
      const r = Math.floor(((event.clientY - rect.top) / rect.height) * ny);
      if (r < 0 || r >= ny || c < 0 || c >= nx) {
        el.tooltip.hidden = true;
        return;
      }
      const i = r * nx + c;
      const lines = [];
      const measured = this.cellSeq[i] !== 0;
      let y = this.cellPos[2 * i];
      let x = this.cellPos[2 * i + 1];
      let where = "";
      if (!Number.isFinite(x) || !Number.isFinite(y)) {
        [y, x] = this.grid.position(r, c);
        where = " (grid)";
      }
      if (this.grid.keys && Number.isFinite(x) && Number.isFinite(y)) {
        const [ky, kx] = this.grid.keys;
        const ux = unitName((this.dataKeys[kx] || {}).units);
        const uy = unitName((this.dataKeys[ky] || {}).units);
        lines.push(`${kx} = ${fmt(x)} ${ux}, ${ky} = ${fmt(y)} ${uy}${where}`);
      }
      lines.push(`row ${r}, column ${c}${measured ? `, seq_num ${this.cellSeq[i]}` : ": not measured yet"}`);
      if (measured) {
        for (const p of ["strain", "omega", "chi"]) {
          const unit = unitName((this.dataKeys[p] || {}).units ?? state.schema.units[p]);
          lines.push(`${SYMBOLS[p]} = ${fmt(this.maps[p][i])} ± ${fmt(this.maps[p + "_err"][i])}${unit ? " " + unit : ""}`);
        }
        lines.push(`flag ${this.maps.flag[i]}: ${flagNames(this.maps.flag[i])}`);
      }
      el.tooltip.textContent = lines.join("\n");
      el.tooltip.hidden = false;
      el.tooltip.style.left = `${event.clientX + 14}px`;
      el.tooltip.style.top = `${event.clientY + 14}px`;
    }
  }

  // ------------------------------------------------------------------ the run list
  function sortedRuns() {
    return [...state.runs.entries()].sort((a, b) => (b[1].start.time || 0) - (a[1].start.time || 0));
  }

  function renderRunList() {
    el.runsBody.textContent = "";
    const selected = state.view ? state.view.uid : null;
    for (const [uid, run] of sortedRuns()) {
      const s = run.start;
      const tr = document.createElement("tr");
      tr.dataset.uid = uid;
      if (uid === selected) tr.className = "selected";
      const events = run.stop && run.stop.num_events;
      let rows = events && Number.isFinite(events.primary) ? String(events.primary) : "running";
      if (uid === selected && !run.stop) rows = `${state.view.received} …`;
      const cells = [
        s.parent_scan_id ? String(s.parent_scan_id) : "—",
        s.sample || "",
        fmtTime(s.time),
        rows,
      ];
      cells.forEach((text, k) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (k === 3) td.className = "rows";
        tr.append(td);
      });
      tr.title = `derived run ${uid}\nraw run ${s.parent_uid || "?"}`;
      tr.addEventListener("click", () => {
        el.follow.checked = false;
        state.follow = false;
        select(uid);
      });
      el.runsBody.append(tr);
    }
  }

  function addRun(start, stop = null) {
    if (!start || !start.uid) return false;
    const known = state.runs.get(start.uid);
    state.runs.set(start.uid, { start, stop: stop || (known ? known.stop : null) });
    return !known;
  }

  async function loadRunList() {
    const body = await getJSON("/search/" + CATALOG, {
      "page[limit]": String(RUN_LIST_LIMIT),
      sort: "-start.time",
      fields: "metadata",
    });
    for (const item of body.data) {
      const md = item.attributes.metadata || {};
      addRun(md.start, md.stop);
    }
    renderRunList();
  }

  function followRuns() {
    state.runsStream = new Stream(CATALOG, {
      open: (schema, resumed) => {
        clearMessage();
        liveStatus();
        if (resumed) loadRunList().catch(() => {});
      },
      message: (msg) => {
        const md = msg.metadata || {};
        if (msg.type === "container-child-created" && md.start) {
          addRun(md.start, md.stop);
          renderRunList();
          if (state.follow) select(md.start.uid);
        } else if (msg.type === "container-child-metadata-updated" && md.start) {
          addRun(md.start, md.stop);
          if (state.view && state.view.uid === msg.key && md.stop) state.view.setStop(md.stop);
          renderRunList();
        }
      },
      lost: (code, reason, delay) => {
        setStatus("reconnecting", "reconnecting…");
        showLoss(code, reason, delay);
      },
    });
    state.runsStream.open();
  }

  async function select(uid) {
    if (state.view && state.view.uid === uid) return;
    if (state.view) state.view.close();
    const view = new RunView(uid);
    state.view = view;
    renderRunList();
    try {
      await view.load();
    } catch (err) {
      if (state.view !== view) return;
      if (err.status === 404) {
        view.close();
        state.view = null;
        el.title.textContent = "no run";
        el.maps.textContent = "";
        el.info.textContent = "";
        showMessage(`No derived run ${uid} in /${CATALOG}. Choose one from the list (the page's address takes #run=<derived run uid>).`);
        renderRunList();
      } else if (err.status !== 401 && err.status !== 403) {
        showMessage(`Could not open run ${uid}: ${err.message}`);
      }
    }
  }

  function stopAll() {
    if (state.view) state.view.close();
    state.view = null;
    if (state.runsStream) state.runsStream.close();
    state.runsStream = null;
  }

  // ------------------------------------------------------------------ start
  async function connect(run) {
    state.authFailed = false;
    setStatus("connecting", "connecting…");
    try {
      state.schema = await (await fetch("schema.json")).json();
    } catch (err) { /* the defaults do without flag names */ }
    try {
      await getJSON("/metadata/" + CATALOG); // checks the key before anything streams
    } catch (err) {
      if (err.status === 404) showMessage(`This server has no /${CATALOG} catalog of derived runs (serve it with \`nanobeam serve\`).`);
      else if (err.status !== 401 && err.status !== 403) showMessage(`Cannot reach the server: ${err.message}. Reload the page to try again.`);
      if (err.status !== 401 && err.status !== 403) setStatus("error", "not connected");
      return;
    }
    el.login.hidden = true;
    el.main.hidden = false;
    clearMessage();
    followRuns();
    await loadRunList();
    if (run) {
      state.follow = false;
      el.follow.checked = false;
      await select(run);
    } else {
      const newest = sortedRuns()[0];
      if (newest) await select(newest[0]);
      else liveStatus();
    }
  }

  el.login.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.key.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    state.key = key;
    el.key.value = "";
    connect(keyFromFragment().run);
  });
  el.follow.addEventListener("change", () => {
    state.follow = el.follow.checked;
    const newest = sortedRuns()[0];
    if (state.follow && newest) select(newest[0]);
  });
  el.showFlagged.addEventListener("change", () => state.view && state.view.requestDraw());
  window.addEventListener("hashchange", () => {
    const { run } = keyFromFragment();
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key && key !== state.key) {
      state.key = key;
      stopAll();
      connect(run);
    } else if (run && state.key) {
      state.follow = false;
      el.follow.checked = false;
      select(run);
    }
  });

  // A hook for tests and scripts: what the page shows, read from its own state.
  window.nanobeamView = {
    status: () => el.status.dataset.state,
    message: () => (el.message.hidden ? "" : el.message.textContent),
    runs: () => sortedRuns().map(([uid]) => uid),
    selectedRun: () => (state.view ? state.view.uid : null),
    shape: () => (state.view && state.view.grid ? state.view.grid.shape.slice() : null),
    filledCells: () => (state.view ? state.view.filled : 0),
    rowsReceived: () => (state.view ? state.view.received : 0),
    complete: () => Boolean(state.view && state.view.stop && state.view.complete()),
    // Row-major (ny * nx) values of a map; null where nothing was measured or there is no value.
    values: (field) => {
      const view = state.view;
      if (!view || !view.maps[field]) return null;
      return Array.from(view.maps[field], (v, i) => (view.cellSeq[i] && Number.isFinite(v) ? v : null));
    },
    // [seq_num, frame time (s), written by the server (ms), arrived in the page (ms)] per row.
    arrivals: () => (state.view ? state.view.arrivals.slice() : []),
  };

  const { run } = keyFromFragment();
  state.key = sessionStorage.getItem(KEY_STORAGE);
  if (!state.key) {
    setStatus("idle", "not connected");
    el.login.hidden = false;
    el.key.focus();
  } else {
    connect(run);
  }
})();

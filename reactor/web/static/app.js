// Reactor dashboard: a live view of the job queue over the reactor's websocket feed.
// Plain modern JavaScript, no build step, nothing loaded from elsewhere. Protocol: README, "Live feed"
// and "Dashboard"; the requests (job, status, action) are answered by reactor/web/dashboard.py.
"use strict";

(() => {
  const TOKEN_KEY = "reactor.dashboard.token";
  const CHART_KEY = "reactor.dashboard.chart";
  const WINDOW_MS = 15 * 60 * 1000; // the chart's span
  const BUCKET_MS = 30 * 1000; // throughput is counted per 30 s, drawn per minute
  const SAMPLE_MS = 5000; // queue depth is sampled at least this often
  const MAX_JOBS = 1000; // jobs kept in memory
  const MAX_ROWS = 200; // rows drawn
  const REQUEST_TIMEOUT_MS = 15000;
  const KNOWN_TYPES = ["doubt", "topic_short", "daily_ca"];

  const $ = (id) => document.getElementById(id);

  // -- state ------------------------------------------------------------------------------------

  const state = {
    token: null,
    ws: null,
    connected: false,
    admin: false,
    seq: null, // the last seq seen: every event up to it has been applied
    stats: null,
    clockOffset: 0, // server time minus this browser's time, ms
    jobs: new Map(), // id -> job
    types: new Set(KNOWN_TYPES),
    alerts: new Map(), // alert name -> {alert, status, value, threshold, since, summary}
    circuits: new Map(), // reactor id -> {circuit, since}
    config: null,
    pause: null,
    detailId: null,
    detailOpener: null,
    retryDelay: 500,
    retryTimer: null,
    signedOutReason: "",
    nextRequest: 1,
    pending: new Map(), // request_id -> {resolve, timer}
    samples: [], // [{t, q, p}]
    buckets: new Map(), // bucket start (ms) -> {c, f}
  };

  // -- small helpers ----------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function badge(kind, value) {
    return el("span", { class: `badge ${kind}-${value}`, text: value });
  }

  function fmtCount(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString();
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Number(seconds));
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 3600) {
      const m = Math.floor(s / 60);
      const r = Math.round(s - m * 60);
      return r ? `${m} min ${r} s` : `${m} min`;
    }
    const h = Math.floor(s / 3600);
    const m = Math.round((s - h * 3600) / 60);
    return m ? `${h} h ${m} min` : `${h} h`;
  }

  function parseTime(iso) {
    const t = iso ? Date.parse(iso) : NaN;
    return isNaN(t) ? null : t;
  }

  function serverNow() {
    return Date.now() + state.clockOffset;
  }

  function fmtClock(iso) {
    const t = parseTime(iso);
    if (t === null) return "–";
    return new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function fmtWhen(iso) {
    const t = parseTime(iso);
    if (t === null) return "–";
    const d = new Date(t);
    const today = new Date();
    if (d.toDateString() === today.toDateString()) {
      return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    }
    return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function shortId(id) {
    return id ? String(id).slice(0, 8) : "–";
  }

  function safeUrl(url) {
    try {
      const u = new URL(url, location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function decodeClaims(token) {
    try {
      const part = token.split(".")[1];
      const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
      return JSON.parse(decodeURIComponent(escape(json)));
    } catch (e) {
      return null;
    }
  }

  function setMsg(node, text, kind) {
    node.textContent = text || "";
    node.classList.toggle("bad", kind === "bad");
    node.classList.toggle("good", kind === "good");
  }

  // -- sign-in ----------------------------------------------------------------------------------

  function readToken() {
    // a token in the fragment (#token=...) wins; it is removed from the address bar at once
    const hash = location.hash.replace(/^#/, "");
    if (hash) {
      const params = new URLSearchParams(hash);
      const t = params.get("token");
      if (t) {
        try { sessionStorage.setItem(TOKEN_KEY, t.trim()); } catch (e) { /* storage off: keep it in memory */ }
        history.replaceState(null, "", location.pathname + location.search);
        return t.trim();
      }
    }
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function signIn(token) {
    state.token = token;
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* ignore */ }
    state.signedOutReason = "";
    state.seq = null;
    showWho();
    $("signin").hidden = true;
    $("signout").hidden = false;
    connect();
  }

  function signOut(reason) {
    state.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignore */ }
    clearTimeout(state.retryTimer);
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      ws.close(1000, "signed out");
    }
    state.connected = false;
    failPending("signed out");
    state.jobs.clear();
    state.stats = null;
    state.alerts.clear();
    state.circuits.clear();
    state.seq = null;
    closeDetail();
    $("dash").hidden = true;
    $("signin").hidden = false;
    $("signout").hidden = true;
    $("who").textContent = "";
    $("signin-error").textContent = reason || "";
    setConn("signed-out", "Signed out");
    renderBanners();
    $("token-input").value = "";
    $("token-input").focus();
  }

  function showWho() {
    const c = decodeClaims(state.token || "") || {};
    const name = c.email || (c.role === "service_role" ? "service role" : c.sub ? `user ${shortId(c.sub)}` : "");
    $("who").textContent = name ? `Signed in as ${name}` : "";
  }

  // -- connection -------------------------------------------------------------------------------

  function setConn(kind, text) {
    const node = $("conn");
    node.dataset.state = kind;
    $("conn-text").textContent = text;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    if (!state.token) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}/feed`);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    setConn(state.seq === null ? "connecting" : "reconnecting", state.seq === null ? "Connecting…" : "Reconnecting…");
    ws.addEventListener("open", () => {
      const auth = { type: "auth", token: state.token };
      if (state.seq !== null) auth.since = state.seq; // resume: exactly the events missed
      ws.send(JSON.stringify(auth));
    });
    ws.addEventListener("message", (ev) => {
      if (ws !== state.ws) return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      handle(msg);
    });
    ws.addEventListener("close", (ev) => {
      if (ws !== state.ws) return;
      state.ws = null;
      state.connected = false;
      failPending("connection lost");
      if (ev.code === 1008) {
        // refused: a bad or expired token; reconnecting would not help
        const reason = ev.reason === "token expired"
          ? "Your token expired: sign in again with a fresh one."
          : `The server refused the token${ev.reason ? `: ${ev.reason}` : "."}`;
        signOut(reason);
        return;
      }
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    if (!state.token) return;
    const delay = Math.min(state.retryDelay, 10000) * (0.75 + Math.random() / 2);
    state.retryDelay = Math.min(state.retryDelay * 2, 10000);
    setConn("reconnecting", `Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    state.retryTimer = setTimeout(connect, delay);
  }

  function send(msg) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify(msg));
    return true;
  }

  function request(msg) {
    return new Promise((resolve) => {
      const id = `r${state.nextRequest++}`;
      if (!send({ ...msg, request_id: id })) {
        resolve({ ok: false, error: "not connected" });
        return;
      }
      const timer = setTimeout(() => {
        state.pending.delete(id);
        resolve({ ok: false, error: "no answer from the server" });
      }, REQUEST_TIMEOUT_MS);
      state.pending.set(id, { resolve, timer });
    });
  }

  function failPending(error) {
    for (const { resolve, timer } of state.pending.values()) {
      clearTimeout(timer);
      resolve({ ok: false, error });
    }
    state.pending.clear();
  }

  // -- messages ---------------------------------------------------------------------------------

  function handle(msg) {
    if (msg.request_id !== undefined && state.pending.has(msg.request_id)) {
      const { resolve, timer } = state.pending.get(msg.request_id);
      state.pending.delete(msg.request_id);
      clearTimeout(timer);
      resolve(msg);
      return;
    }
    switch (msg.type) {
      case "snapshot": onSnapshot(msg); break;
      case "resumed":
        $("conn").dataset.mode = "resumed";
        onLive();
        if (state.admin) refreshStatus(); // the feed pushes stats only after events: read them now
        break;
      case "resync": break; // a fresh snapshot follows
      case "event": onEvent(msg); break;
      case "stats": onStats(msg.stats); break;
      case "position": onPosition(msg); break;
      case "heartbeat":
        if (typeof msg.seq === "number") state.seq = Math.max(state.seq || 0, msg.seq);
        if (state.admin) refreshStatus();
        break;
      case "alert": onAlert(msg); break;
      case "circuit": onCircuit(msg); break;
      default: break;
    }
  }

  function onLive() {
    state.connected = true;
    state.retryDelay = 500;
    setConn("live", "Live");
    $("dash").hidden = false;
  }

  function onSnapshot(msg) {
    state.admin = msg.stats !== null && msg.stats !== undefined;
    document.body.classList.toggle("is-admin", state.admin);
    for (const node of document.querySelectorAll(".admin-only")) node.hidden = !state.admin;
    $("jobs-title").textContent = state.admin ? "Recent jobs" : "Your jobs";
    state.jobs.clear();
    for (const j of msg.jobs || []) upsertJob(j);
    for (const j of msg.queue || []) upsertJob(j);
    if (state.admin) for (const j of state.jobs.values()) delete j.queue_position; // only users get position updates
    state.seq = msg.seq;
    $("conn").dataset.mode = "snapshot";
    if (state.admin) {
      onStats(msg.stats);
      refreshStatus();
    }
    onLive();
    for (const j of state.jobs.values()) {
      if (j.status === "failed" && !j.error_message) fetchError(j.id);
    }
    scheduleRender();
    if (state.detailId) loadDetail(state.detailId);
  }

  function upsertJob(j) {
    const old = state.jobs.get(j.id) || {};
    const job = { ...old, ...j };
    state.jobs.set(j.id, job);
    if (job.job_type) state.types.add(job.job_type);
    return job;
  }

  function onEvent(msg) {
    if (typeof msg.seq === "number") {
      if (state.seq !== null && msg.seq <= state.seq) return; // seen already
      state.seq = msg.seq;
    }
    const e = msg.job || {};
    if (!e.id) return;
    if (msg.kind === "deleted") {
      state.jobs.delete(e.id);
      scheduleRender();
      return;
    }
    const old = state.jobs.get(e.id);
    const job = upsertJob({
      id: e.id, status: e.status, priority: e.priority, job_type: e.job_type, renderer: e.renderer,
      user_id: e.user_id, retry_count: e.retry_count, error_category: e.error_category, updated_at: msg.at,
    });
    if (!old) job.created_at = msg.at;
    if (e.video_url) job.video_url = e.video_url;
    job.scheduled = Boolean(e.scheduled);
    job.run_after = e.run_after || null;
    if (job.status !== "queued") delete job.queue_position;
    if (!e.error_category) job.error_message = null;
    if (msg.kind === "failed" || msg.kind === "retrying") {
      job.error_message = null;
      fetchError(e.id);
    }
    if (msg.kind === "completed" || msg.kind === "failed") {
      const at = parseTime(msg.at);
      countThroughput(at === null ? Date.now() : at - state.clockOffset, msg.kind === "completed" ? "c" : "f");
    }
    trimJobs();
    scheduleRender();
    if (state.detailId === e.id) scheduleDetailReload();
  }

  function trimJobs() {
    if (state.jobs.size <= MAX_JOBS) return;
    const byAge = [...state.jobs.values()].sort((a, b) => (parseTime(a.created_at) || 0) - (parseTime(b.created_at) || 0));
    for (const j of byAge.slice(0, state.jobs.size - MAX_JOBS)) state.jobs.delete(j.id);
  }

  const errorFetches = new Set();
  function fetchError(id) {
    // events carry a job's error category; its message comes with the job itself
    if (errorFetches.has(id) || errorFetches.size > 20) return;
    errorFetches.add(id);
    request({ type: "job", id }).then((r) => {
      errorFetches.delete(id);
      if (r.job) {
        const j = state.jobs.get(id);
        if (j) {
          j.error_message = r.job.error_message;
          j.error_category = r.job.error_category;
          if (r.job.created_at) j.created_at = r.job.created_at;
          scheduleRender();
        }
      }
    });
  }

  function onPosition(msg) {
    const j = state.jobs.get(msg.job_id);
    if (j) {
      j.queue_position = msg.queue_position;
      scheduleRender();
    }
  }

  function onStats(stats, fromStatus) {
    if (!stats) return;
    const prev = state.stats;
    state.stats = stats;
    // the limits changed (a pause, a resume, new limits, peak hours began): re-read the configuration
    if (!fromStatus && prev && ["paused", "peak", "max_renders", "max_manim_renders"].some((k) => prev[k] !== stats[k])) {
      refreshStatus();
    }
    const asOf = parseTime(stats.as_of);
    if (asOf !== null) state.clockOffset = asOf - Date.now();
    sample(false);
    renderTiles();
    renderBanners();
    renderControls();
  }

  async function refreshStatus() {
    const r = await request({ type: "status" });
    if (r.error) return;
    state.alerts.clear();
    for (const a of r.alerts || []) state.alerts.set(a.alert, a);
    state.circuits.clear();
    for (const c of r.circuits || []) state.circuits.set(c.reactor, c);
    state.config = r.config;
    state.pause = r.pause;
    renderSchedules(r.schedules || []);
    if (r.stats && (!state.stats || r.stats.last_seq >= state.stats.last_seq)) onStats(r.stats, true);
    renderBanners();
    renderControls();
  }

  function onAlert(msg) {
    if (msg.status === "firing") state.alerts.set(msg.alert, msg);
    else state.alerts.delete(msg.alert);
    renderBanners();
  }

  function onCircuit(msg) {
    if (msg.circuit && msg.circuit !== "closed") state.circuits.set(msg.reactor, msg);
    else state.circuits.delete(msg.reactor);
    renderBanners();
  }

  // -- tiles, bars, banners, controls -----------------------------------------------------------

  function setTile(id, value, sub, alarm) {
    const tile = $(id);
    tile.querySelector(".value").textContent = value;
    if (sub !== undefined) tile.querySelector(".sub").textContent = sub;
    tile.classList.toggle("alarm", Boolean(alarm));
  }

  function oldestAge() {
    const s = state.stats;
    const t = s && parseTime(s.oldest_queued_at);
    return t ? (serverNow() - t) / 1000 : null;
  }

  function renderTiles() {
    const s = state.stats;
    if (!s) return;
    setTile("tile-queued", fmtCount(s.queued), `${fmtCount(s.total)} jobs in all`);
    setTile("tile-processing", fmtCount(s.processing), "");
    setTile("tile-completed", fmtCount(s.completed_last_hour), `${fmtCount(s.completed)} in all`);
    setTile("tile-failed", fmtCount(s.failed_last_hour), `${fmtCount(s.failed)} in all`, s.failed_last_hour > 0);
    setTile("tile-wait", fmtDuration(s.avg_wait_seconds));
    renderOldest();
    setTile("tile-limits", `${fmtCount(s.max_renders)} / ${fmtCount(s.max_manim_renders)}`,
      `renders / Manim renders${s.peak ? ", peak hours" : ""}`);
    setTile("tile-dispatch", s.paused ? "Paused" : "Running",
      s.paused ? pausedText() : (s.peak ? "peak hours: limits multiplied" : "off-peak"), s.paused);
    const total = Math.max(1, s.queued_high + s.queued_medium + s.queued_low);
    for (const p of ["high", "medium", "low"]) {
      const n = s[`queued_${p}`];
      const li = $(`prio-${p}`);
      li.querySelector(".n").textContent = fmtCount(n);
      li.querySelector(".fill").style.width = `${(100 * n) / total}%`;
    }
  }

  function renderSchedules(rows) {
    const body = $("schedules-body");
    body.replaceChildren(...rows.map((s) => el("tr", { dataset: { schedule: s.name } },
      el("td", { class: "mono", text: s.name }),
      el("td", { class: "mono", text: `${s.cron} ${s.timezone}` }),
      el("td", { text: s.job_type }),
      el("td", { class: "next-run", text: s.enabled ? fmtWhen(s.next_run_at) : "disabled" }),
      el("td", { text: s.last_run_at ? fmtWhen(s.last_run_at) : "–" }),
      el("td", { text: fmtCount(s.jobs_created) }),
    )));
    body.parentElement.hidden = rows.length === 0;
    $("schedules-empty").hidden = rows.length !== 0;
  }

  function renderOldest() {
    const age = oldestAge();
    setTile("tile-oldest", age === null ? "none" : fmtDuration(age),
      age === null ? "nothing queued" : `since ${fmtClock(state.stats.oldest_queued_at)}`);
  }

  function pausedText() {
    const p = state.pause;
    if (!p || !p.paused_at) return "no new renders start";
    return `since ${fmtClock(p.paused_at)}${p.paused_by ? ` by ${p.paused_by}` : ""}`;
  }

  const ALERT_TEXT = {
    queue_depth: (a) => `Queue depth ${fmtCount(a.value)} is above ${fmtCount(a.threshold)}`,
    failed_per_hour: (a) => `${fmtCount(a.value)} jobs failed in the last hour (threshold ${fmtCount(a.threshold)})`,
    avg_wait: (a) => `Average wait ${fmtDuration(a.value)} is above ${fmtDuration(a.threshold)}`,
    oldest_queued: (a) => `The oldest queued job has waited ${fmtDuration(a.value)} (threshold ${fmtDuration(a.threshold)})`,
    render_farm_unreachable: (a) => `Render farm unreachable for ${fmtDuration(a.value)}`,
  };

  function renderBanners() {
    const box = $("banners");
    const items = [];
    const waiting = state.stats ? fmtCount(state.stats.queued) : "?";
    if (state.circuits.size) {
      const circuits = [...state.circuits.values()];
      const since = circuits.map((c) => c.since).filter(Boolean).sort()[0];
      const trying = circuits.every((c) => c.circuit === "half_open");
      items.push(el("div", { class: "banner", role: "alert", dataset: { kind: "circuit" } },
        `Render farm unreachable${since ? ` since ${fmtClock(since)}` : ""}, ${waiting} jobs waiting`,
        trying ? el("span", { class: "when", text: " (trying one job)" }) : null));
    }
    for (const a of state.alerts.values()) {
      if (a.alert === "render_farm_unreachable" && state.circuits.size) continue; // said above
      const text = a.summary || (ALERT_TEXT[a.alert] ? ALERT_TEXT[a.alert](a) : `Alert ${a.alert}`);
      items.push(el("div", { class: "banner", role: "alert", dataset: { kind: "alert", alert: a.alert } },
        text, el("span", { class: "when", text: a.since ? ` (since ${fmtClock(a.since)})` : "" })));
    }
    if (state.admin && state.stats && state.stats.paused) {
      items.push(el("div", { class: "banner warn", dataset: { kind: "paused" } },
        `Dispatch is paused: no new render starts (${pausedText()}). ${waiting} jobs waiting.`));
    }
    box.replaceChildren(...items);
  }

  function renderControls() {
    const paused = Boolean(state.stats && state.stats.paused);
    $("pause-btn").hidden = paused || !$("pause-confirm").hidden;
    $("resume-btn").hidden = !paused;
    if (paused) $("pause-confirm").hidden = true;
    const c = state.config;
    if (c) {
      const form = $("limits-form");
      if (!form.contains(document.activeElement) && !form.dataset.dirty) {
        $("limit-renders").value = c.max_concurrent_renders;
        $("limit-manim").value = c.max_manim_renders;
      }
      const peak = c.peak_hour_start && c.peak_hour_end
        ? `Peak hours ${c.peak_hour_start.slice(0, 5)}–${c.peak_hour_end.slice(0, 5)} ${c.timezone}: limits ×${c.peak_worker_multiplier}.`
        : "No peak hours set.";
      $("config-note").textContent = `Configured: ${c.max_concurrent_renders} renders, ${c.max_manim_renders} Manim. ${peak}`
        + (paused && state.pause && state.pause.previous ? ` Resume restores ${state.pause.previous} renders.` : "");
    }
  }

  async function act(action, extra, msgNode) {
    setMsg(msgNode, "Working…");
    const r = await request({ type: "action", action, ...extra });
    if (r.ok) {
      setMsg(msgNode, r.changed === false ? "Nothing to change." : "Done.", "good");
    } else {
      setMsg(msgNode, r.error === "forbidden" ? "Not allowed: only an admin can do this." : `Refused: ${r.error}`, "bad");
    }
    if (state.admin) refreshStatus();
    return r;
  }

  // -- jobs table -------------------------------------------------------------------------------

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderJobs();
    });
  }

  function filters() {
    return {
      search: $("f-search").value.trim().toLowerCase(),
      status: $("f-status").value,
      priority: $("f-priority").value,
      type: $("f-type").value,
      user: $("f-user").value.trim().toLowerCase(),
    };
  }

  function matches(j, f) {
    if (f.search && !String(j.id).toLowerCase().includes(f.search)) return false;
    if (f.status && j.status !== f.status) return false;
    if (f.priority && j.priority !== f.priority) return false;
    if (f.type && j.job_type !== f.type) return false;
    if (f.user && !String(j.user_id || "").toLowerCase().includes(f.user)) return false;
    return true;
  }

  function renderTypeOptions() {
    const select = $("f-type");
    const have = new Set([...select.options].map((o) => o.value));
    for (const t of [...state.types].sort()) {
      if (!have.has(t)) select.append(el("option", { value: t, text: t }));
    }
  }

  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  function renderJobs() {
    renderTypeOptions();
    const f = filters();
    const all = [...state.jobs.values()].filter((j) => matches(j, f));
    all.sort((a, b) => (parseTime(b.created_at) || 0) - (parseTime(a.created_at) || 0) || String(b.id).localeCompare(String(a.id)));
    const rows = all.slice(0, MAX_ROWS).map(jobRow);
    // keep keyboard focus on the same job's button across a redraw
    const focused = document.activeElement;
    const focusedRow = focused && $("jobs-body").contains(focused) ? focused.closest("tr").dataset.id : null;
    $("jobs-body").replaceChildren(...rows);
    if (focusedRow) focusJobButton(focusedRow);
    const total = state.jobs.size;
    const filtered = f.search || f.status || f.priority || f.type || f.user;
    let text = filtered ? `${all.length} of ${total} jobs match` : `${total} jobs`;
    if (all.length > MAX_ROWS) text += `; showing the newest ${MAX_ROWS}`;
    if (!all.length && UUID_RE.test(f.search)) text += ": not among the recent jobs; press Enter to look it up";
    $("jobs-count").textContent = text;
    $("lookup-btn").hidden = !UUID_RE.test(f.search) || state.jobs.has(f.search.toLowerCase());
  }

  function focusJobButton(id) {
    for (const tr of $("jobs-body").rows) {
      if (tr.dataset.id === id) {
        tr.querySelector("button").focus();
        return true;
      }
    }
    return false;
  }

  function jobRow(j) {
    const status = [badge("status", j.status)];
    if (j.status === "queued" && j.scheduled) {
      status.push(el("span", { class: "badge scheduled", text: "scheduled", title: `runs at ${fmtWhen(j.run_after)}` }));
    } else if (j.status === "queued" && j.queue_position) {
      status.push(el("span", { class: "hint", text: ` #${j.queue_position}` }));
    }
    if (j.retry_count) status.push(el("span", { class: "hint", text: ` retry ${j.retry_count}` }));
    const err = j.error_category
      ? [el("span", { class: "cat", text: j.error_category }), j.error_message ? el("span", { class: "m", text: ` ${j.error_message}` }) : null]
      : [];
    const url = j.video_url && safeUrl(j.video_url);
    return el("tr", { dataset: { id: j.id, status: j.status } },
      el("td", null, el("button", {
        type: "button", class: "linkish job-id", text: shortId(j.id), title: j.id,
        "aria-label": `Job ${j.id}: show details`, onclick: (ev) => openDetail(j.id, ev.currentTarget),
      })),
      el("td", { text: j.job_type || "–" }),
      el("td", null, j.priority ? badge("prio", j.priority) : "–"),
      el("td", { class: "status" }, ...status),
      el("td", { class: `opt mono${j.user_id ? "" : " none"}`, title: j.user_id || "", text: j.user_id ? shortId(j.user_id) : "–" }),
      el("td", { class: "opt", text: fmtWhen(j.created_at) }),
      el("td", { class: "err" }, ...err),
      el("td", { class: `opt${url ? "" : " none"}` }, url ? el("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: "video" }) : "–"),
    );
  }

  // -- job detail -------------------------------------------------------------------------------

  function openDetail(id, opener) {
    state.detailId = id;
    state.detailOpener = opener || document.activeElement;
    $("detail-title").textContent = `Job ${shortId(id)}`;
    $("detail-body").replaceChildren(el("p", { class: "hint", text: "Loading…" }));
    $("detail-actions").replaceChildren();
    setMsg($("detail-msg"), "");
    const dialog = $("detail");
    if (!dialog.open) dialog.showModal();
    $("detail-close").focus();
    loadDetail(id);
  }

  function closeDetail() {
    const dialog = $("detail");
    if (dialog.open) dialog.close();
  }

  let detailTimer = null;
  function scheduleDetailReload() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => { if (state.detailId) loadDetail(state.detailId); }, 150);
  }

  async function loadDetail(id) {
    const r = await request({ type: "job", id });
    if (state.detailId !== id) return;
    if (!r.job) {
      $("detail-body").replaceChildren(el("p", { class: "error", text: r.error === "not found" ? "No such job (or not yours)." : `Cannot load the job: ${r.error}` }));
      return;
    }
    const j = r.job;
    const known = state.jobs.get(j.id);
    if (known) Object.assign(known, { status: j.status, error_message: j.error_message, error_category: j.error_category, created_at: j.created_at });
    else if (state.admin || j.user_id) upsertJob(pickJob(j));
    scheduleRender();
    renderDetail(j, r.events || []);
  }

  function pickJob(j) {
    const out = {};
    for (const k of ["id", "status", "priority", "job_type", "renderer", "user_id", "retry_count", "max_retries",
      "error_category", "error_message", "created_at", "updated_at", "started_at", "completed_at"]) out[k] = j[k];
    if (j.result && j.result.video_url) out.video_url = j.result.video_url;
    return out;
  }

  function kv(pairs) {
    const dl = el("dl", { class: "kv" });
    for (const [k, v] of pairs) {
      if (v === null || v === undefined || v === "") continue;
      dl.append(el("dt", { text: k }), el("dd", null, v));
    }
    return dl;
  }

  function pre(value) {
    return el("pre", { class: "json", text: JSON.stringify(value, null, 2) });
  }

  function renderDetail(j, events) {
    $("detail-title").textContent = `Job ${j.id}`;
    const result = j.result || null;
    const video = result && result.video_url && safeUrl(result.video_url);
    const body = [
      kv([
        ["Status", el("span", null, badge("status", j.status), j.queue_position ? ` position ${j.queue_position}` : "")],
        ["Priority", badge("prio", j.priority)],
        ["Type", `${j.job_type} (${j.renderer})`],
        ["User", j.user_id],
        ["Retries", `${j.retry_count} of ${j.max_retries}`],
        ["Created", fmtWhen(j.created_at)],
        ["Started", j.started_at ? fmtWhen(j.started_at) : null],
        ["Finished", j.completed_at ? fmtWhen(j.completed_at) : null],
        ["Next try", j.status === "queued" && j.run_after && parseTime(j.run_after) > serverNow() ? fmtWhen(j.run_after) : null],
        ["Rendering on", j.status === "processing" ? j.locked_by : null],
        ["Video", video ? el("a", { href: video, target: "_blank", rel: "noopener noreferrer", text: video }) : null],
      ]),
    ];
    if (j.error_category || j.error_message) {
      body.push(el("h3", { text: "Error" }),
        el("p", { class: "detail-error" }, el("span", { class: "cat", text: j.error_category || "" }), " ", j.error_message || ""));
      if (j.error_details) body.push(pre(j.error_details));
    }
    body.push(el("h3", { text: "Payload" }), pre(j.payload));
    if (result) body.push(el("h3", { text: "Result" }), pre(result));
    body.push(el("h3", { text: "History" }));
    const rows = events.map((e) => el("tr", null,
      el("td", { class: "mono", text: e.seq }),
      el("td", { text: fmtWhen(e.at) }),
      el("td", { text: e.kind }),
      el("td", null, e.status ? badge("status", e.status) : "–"),
      el("td", { text: e.error_category || "" }),
      state.admin ? el("td", { class: "mono", text: e.actor || "" }) : null,
    ));
    body.push(el("div", { class: "table-wrap" }, el("table", { class: "history" },
      el("thead", null, el("tr", null,
        el("th", { scope: "col", text: "seq" }), el("th", { scope: "col", text: "at" }), el("th", { scope: "col", text: "event" }),
        el("th", { scope: "col", text: "status" }), el("th", { scope: "col", text: "error" }),
        state.admin ? el("th", { scope: "col", text: "by" }) : null)),
      el("tbody", null, ...rows))));
    $("detail-body").replaceChildren(...body);
    renderDetailActions(j);
  }

  function renderDetailActions(j) {
    const box = $("detail-actions");
    const msg = $("detail-msg");
    box.replaceChildren();
    if (!state.admin) return;
    if (j.status === "queued" || j.status === "processing") {
      const cancel = el("button", { type: "button", class: "btn btn-danger", id: "cancel-btn", text: "Cancel job" });
      cancel.addEventListener("click", () => {
        const yes = el("button", { type: "button", class: "btn btn-danger", id: "cancel-yes", text: "Yes, cancel it" });
        const no = el("button", { type: "button", class: "btn", id: "cancel-no", text: "Keep it" });
        yes.addEventListener("click", async () => {
          yes.disabled = no.disabled = true;
          await act("cancel", { id: j.id }, msg);
          loadDetail(j.id);
        });
        no.addEventListener("click", () => { renderDetailActions(j); $("cancel-btn").focus(); });
        box.replaceChildren(el("span", { text: "Cancel this job?" }), yes, no);
        no.focus();
      });
      box.append(cancel);
    }
    if (j.status === "failed" || j.status === "cancelled") {
      const retry = el("button", { type: "button", class: "btn btn-primary", id: "retry-btn", text: "Retry job" });
      retry.addEventListener("click", async () => {
        retry.disabled = true;
        await act("retry", { id: j.id }, msg);
        loadDetail(j.id);
      });
      box.append(retry);
    }
  }

  // -- chart ------------------------------------------------------------------------------------

  function sample(force) {
    const s = state.stats;
    if (!s) return;
    const now = Date.now();
    const last = state.samples[state.samples.length - 1];
    const point = { t: now, q: Number(s.queued) || 0, p: Number(s.processing) || 0 };
    if (!force && last && now - last.t < 2000) state.samples[state.samples.length - 1] = point;
    else state.samples.push(point);
    trimChart(now);
    scheduleChart();
  }

  function countThroughput(t, kind) {
    if (Date.now() - t > WINDOW_MS) return;
    const start = Math.floor(t / BUCKET_MS) * BUCKET_MS;
    const b = state.buckets.get(start) || { c: 0, f: 0 };
    b[kind] += 1;
    state.buckets.set(start, b);
    scheduleChart();
  }

  function trimChart(now) {
    const from = now - WINDOW_MS - SAMPLE_MS;
    while (state.samples.length && state.samples[0].t < from) state.samples.shift();
    for (const k of state.buckets.keys()) if (k < from - BUCKET_MS) state.buckets.delete(k);
  }

  function saveChart() {
    try {
      sessionStorage.setItem(CHART_KEY, JSON.stringify({ samples: state.samples, buckets: [...state.buckets] }));
    } catch (e) { /* full or off: the chart is only lost on reload */ }
  }

  function loadChart() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(CHART_KEY) || "null");
      if (saved && Array.isArray(saved.samples)) state.samples = saved.samples.filter((p) => p && typeof p.t === "number");
      if (saved && Array.isArray(saved.buckets)) state.buckets = new Map(saved.buckets);
      trimChart(Date.now());
    } catch (e) { /* ignore a damaged entry */ }
  }

  let chartQueued = false;
  function scheduleChart() {
    if (chartQueued) return;
    chartQueued = true;
    requestAnimationFrame(() => { chartQueued = false; drawChart(); });
  }

  function niceMax(v) {
    if (v <= 4) return 4;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart() {
    const canvas = $("chart");
    if (!canvas || canvas.offsetParent === null) return;
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pad = { l: 38, r: 44, t: 10, b: 22 };
    const pw = Math.max(10, w - pad.l - pad.r);
    const ph = Math.max(10, h - pad.t - pad.b);
    const now = Date.now();
    const from = now - WINDOW_MS;
    const x = (t) => pad.l + ((t - from) / WINDOW_MS) * pw;

    // throughput per minute, from the 30 s buckets
    let maxRate = 0;
    const bars = [];
    for (const [start, b] of state.buckets) {
      if (start + BUCKET_MS < from) continue;
      const perMin = 60000 / BUCKET_MS;
      bars.push({ start, c: b.c * perMin, f: b.f * perMin });
      maxRate = Math.max(maxRate, (b.c + b.f) * perMin);
    }
    let maxQ = 0;
    for (const p of state.samples) maxQ = Math.max(maxQ, p.q, p.p);
    const qTop = niceMax(maxQ);
    const rTop = niceMax(maxRate);
    const yQ = (v) => pad.t + ph - (v / qTop) * ph;
    const yR = (v) => pad.t + ph - (v / rTop) * ph;

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = color("--chart-grid");
    ctx.fillStyle = color("--chart-text");
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + (ph * i) / 4;
      ctx.beginPath();
      ctx.moveTo(pad.l, Math.round(y) + 0.5);
      ctx.lineTo(pad.l + pw, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText(String(Math.round((qTop * (4 - i)) / 4)), pad.l - 6, y);
      ctx.textAlign = "left";
      ctx.fillText(String(Math.round((rTop * (4 - i)) / 4)), pad.l + pw + 6, y);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "center";
    for (const m of [15, 10, 5, 0]) {
      ctx.fillText(m ? `-${m} min` : "now", x(now - m * 60000), h - 6);
    }

    // bars: completed (bottom) and failed (stacked) per minute
    const bw = Math.max(1, (BUCKET_MS / WINDOW_MS) * pw - 1);
    for (const b of bars) {
      const bx = Math.max(pad.l, x(b.start));
      const width = Math.min(bw, pad.l + pw - bx); // the current bucket ends at "now"
      if (width <= 0) continue;
      ctx.fillStyle = color("--chart-completed");
      ctx.fillRect(bx, yR(b.c), width, pad.t + ph - yR(b.c));
      if (b.f) {
        ctx.fillStyle = color("--chart-failed");
        ctx.fillRect(bx, yR(b.c + b.f), width, yR(b.c) - yR(b.c + b.f));
      }
    }

    // lines: queue depth and processing
    const line = (key, name) => {
      const pts = state.samples.filter((p) => p.t >= from - SAMPLE_MS);
      if (!pts.length) return;
      ctx.strokeStyle = color(name);
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach((p, i) => {
        const px = Math.max(pad.l, x(p.t));
        if (i === 0) ctx.moveTo(px, yQ(p[key]));
        else ctx.lineTo(px, yQ(p[key]));
      });
      ctx.lineTo(x(now), yQ(pts[pts.length - 1][key])); // the last value holds until now
      ctx.stroke();
    };
    line("p", "--chart-processing");
    line("q", "--chart-queued");
  }

  // -- wiring -----------------------------------------------------------------------------------

  function init() {
    loadChart();
    $("signin-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
      if (!t || t.split(".").length !== 3) {
        $("signin-error").textContent = "That does not look like a JWT (three parts separated by dots).";
        $("token-input").focus();
        return;
      }
      $("signin-error").textContent = "";
      signIn(t);
    });
    $("token-input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { // a token has no new lines: Enter signs in
        ev.preventDefault();
        $("signin-form").requestSubmit();
      }
    });
    $("signout").addEventListener("click", () => signOut(""));

    for (const id of ["f-status", "f-priority", "f-type"]) $(id).addEventListener("change", scheduleRender);
    for (const id of ["f-search", "f-user"]) $(id).addEventListener("input", scheduleRender);
    $("filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const q = $("f-search").value.trim().toLowerCase();
      if (UUID_RE.test(q)) openDetail(q, $("f-search"));
    });

    const dialog = $("detail");
    $("detail-close").addEventListener("click", closeDetail);
    dialog.addEventListener("close", () => {
      const id = state.detailId;
      const opener = state.detailOpener;
      state.detailId = null;
      state.detailOpener = null;
      if (opener && document.contains(opener)) opener.focus();
      else if (!(id && focusJobButton(id))) $("jobs-title").focus();
    });
    dialog.addEventListener("click", (ev) => { if (ev.target === dialog) closeDetail(); }); // the backdrop

    $("pause-btn").addEventListener("click", () => {
      $("pause-btn").hidden = true;
      $("pause-confirm").hidden = false;
      $("pause-no").focus();
    });
    $("pause-no").addEventListener("click", () => {
      $("pause-confirm").hidden = true;
      $("pause-btn").hidden = false;
      $("pause-btn").focus();
    });
    $("pause-yes").addEventListener("click", async () => {
      $("pause-confirm").hidden = true;
      await act("pause", {}, $("controls-msg"));
      renderControls();
    });
    $("resume-btn").addEventListener("click", async () => {
      await act("resume", {}, $("controls-msg"));
      renderControls();
    });
    const limits = $("limits-form");
    limits.addEventListener("input", () => { limits.dataset.dirty = "1"; });
    limits.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const values = {};
      for (const input of [$("limit-renders"), $("limit-manim")]) {
        const v = Number(input.value);
        if (input.value === "" || !Number.isInteger(v) || v < 0 || v > 100000) {
          setMsg($("controls-msg"), `${input.labels[0].textContent}: a whole number from 0 to 100000`, "bad");
          input.focus();
          return;
        }
        values[input.name] = v;
      }
      const r = await act("set_limits", { values }, $("controls-msg"));
      if (r.ok) delete limits.dataset.dirty;
    });

    setInterval(() => {
      if (state.stats) {
        sample(true);
        renderOldest();
        saveChart();
      }
      scheduleChart();
    }, SAMPLE_MS);
    setInterval(() => { if (state.stats) renderOldest(); }, 1000);
    window.addEventListener("resize", scheduleChart);
    window.addEventListener("hashchange", () => {
      const t = readToken();
      if (t && t !== state.token) { if (state.ws) state.ws.close(1000); signIn(t); }
    });

    const token = readToken();
    if (token) signIn(token);
    else signOut("");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

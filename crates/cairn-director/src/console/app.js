/*
 * cairn web console.
 *
 * A thin client of the REST API under /api/: it keeps no state of its own but the API token
 * (in the tab's session storage) and checks nothing the server does not check again.
 *
 * Two rules hold throughout, because the page runs under a strict Content-Security-Policy and
 * shows text that comes from VMs, hosts and logs:
 *   - no HTML is ever built from strings: every node is made with el() / svg() and every value
 *     goes in as a text node or a property;
 *   - no inline style: looks come from classes in app.css (the chart's colours too).
 *
 * Pages are chosen by the location hash (#/jobs, #/tasks/12, ...). Each page gets a context
 * whose timers and object URLs are dropped when another page is shown, so a slow answer or a
 * poll of a page that is gone never touches the one shown now.
 */
(function () {
  'use strict';

  const TOKEN_KEY = 'cairn-token';
  // A restore point's ID: the only thing a link may put into an API path after /api/points/.
  const POINT_ID = /^[0-9a-f]{64}$/;

  // ---------------------------------------------------------------- DOM helpers

  /** Appends children to node: nodes as they are, strings and numbers as text, arrays flattened,
   *  null / undefined / false skipped (so `cond && el(...)` works). */
  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
    return node;
  }

  // Set as properties rather than attributes: their live state is what counts.
  const PROPS = new Set(['value', 'checked', 'selected', 'disabled', 'hidden', 'textContent', 'noValidate', 'multiple']);

  /**
   * Makes an element: el('a', {href: '#/vms', class: 'x', dataset: {vm: id}, onclick: fn}, 'text', child).
   * Children are added before the attributes so a select's `value` picks among its options.
   */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    append(node, children);
    if (attrs) {
      for (const [key, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (key.startsWith('on') && typeof v === 'function') node.addEventListener(key.slice(2), v);
        else if (key === 'class') node.className = v;
        else if (key === 'dataset') Object.assign(node.dataset, v);
        else if (PROPS.has(key)) node[key] = v;
        else node.setAttribute(key, v === true ? '' : String(v));
      }
    }
    return node;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** Makes an SVG element (attributes only; presentation comes from classes). */
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    if (attrs) {
      for (const [key, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        node.setAttribute(key, String(v));
      }
    }
    return append(node, children);
  }

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- formatting

  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return '—';
    let v = Number(n);
    let i = 0;
    while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
      v /= 1024;
      i++;
    }
    if (i === 0) return v + ' B';
    return (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + ' ' + UNITS[i];
  }

  function parseTime(t) {
    if (!t) return null;
    const ms = Date.parse(t);
    return isNaN(ms) ? null : ms;
  }

  /** Local date and time of an RFC 3339 time. */
  function fmtTime(t) {
    const ms = typeof t === 'number' ? t : parseTime(t);
    if (ms === null) return '—';
    return new Date(ms).toLocaleString(undefined, {
      year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
    });
  }

  /** A shorter local time for table cells: no seconds, the year only when not this one. */
  function fmtTimeShort(t) {
    const ms = typeof t === 'number' ? t : parseTime(t);
    if (ms === null) return '—';
    const d = new Date(ms);
    return d.toLocaleString(undefined, {
      year: d.getFullYear() === new Date().getFullYear() ? undefined : 'numeric',
      month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
    });
  }

  /** "3 h ago", "in 20 min", "just now". */
  function fmtRelative(t) {
    const ms = typeof t === 'number' ? t : parseTime(t);
    if (ms === null) return '—';
    const diff = Date.now() - ms;
    const s = Math.abs(diff) / 1000;
    let text;
    if (s < 45) return diff >= 0 ? 'just now' : 'in a moment';
    if (s < 90 * 60) text = Math.round(s / 60) + ' min';
    else if (s < 36 * 3600) text = Math.round(s / 3600) + ' h';
    else if (s < 60 * 86400) text = Math.round(s / 86400) + ' d';
    else text = Math.round(s / (30 * 86400)) + ' mo';
    return diff >= 0 ? text + ' ago' : 'in ' + text;
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || !isFinite(ms) || ms < 0) return '—';
    const s = Math.round(ms / 1000);
    if (s < 60) return s + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min ' + (s % 60) + ' s';
    const h = Math.floor(m / 60);
    if (h < 48) return h + ' h ' + (m % 60) + ' min';
    return Math.floor(h / 24) + ' d ' + (h % 24) + ' h';
  }

  /** A time shown relative, with the full local time on hover. */
  function timeSpan(t, emptyText) {
    if (!t) return el('span', { class: 'muted' }, emptyText || '—');
    return el('time', { datetime: t, title: fmtTime(t) }, fmtRelative(t));
  }

  /** A time shown in full, with the relative time after it. */
  function timeFull(t) {
    if (!t) return el('span', { class: 'muted' }, '—');
    return el('span', null, el('time', { datetime: t }, fmtTime(t)), ' ', el('span', { class: 'muted' }, '(' + fmtRelative(t) + ')'));
  }

  const shortId = (id) => (typeof id === 'string' ? id : JSON.stringify(id)).slice(0, 12);

  function plural(n, word) {
    return n + ' ' + word + (n === 1 ? '' : 's');
  }

  // ---------------------------------------------------------------- badges

  // Colour families of every state word the API gives (task states, boot verdicts).
  const TONES = {
    ok: 'ok', passed: 'ok',
    warning: 'warning', inconclusive: 'warning',
    failed: 'failed', interrupted: 'failed',
    running: 'running', queued: 'running',
    cancelled: 'cancelled', disabled: 'cancelled',
  };

  /** A state word in a coloured pill; its text is exactly the word. */
  function badge(state, title) {
    const word = state === null || state === undefined ? '—' : String(state);
    return el('span', { class: 'badge badge-' + (TONES[word] || 'neutral'), title: title || null }, word);
  }

  // ---------------------------------------------------------------- messages

  /** Shows an error (the server's text) in the banner above the page. */
  function showMessage(text) {
    const msg = $('message');
    msg.textContent = text;
    msg.hidden = false;
    $('message-bar').hidden = false;
  }

  function clearMessage() {
    const msg = $('message');
    msg.textContent = '';
    msg.hidden = true;
    $('message-bar').hidden = true;
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** Thrown after a 401 has sent the user back to the login form: callers just stop. */
  class SignedOut extends Error {}

  /** The server's message of an error answer: its JSON `error`, else its text or status. */
  async function errorText(res) {
    let text = '';
    try {
      text = await res.text();
    } catch (e) {
      text = '';
    }
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === 'string') return body.error;
    } catch (e) {
      // Not JSON: use the text itself.
    }
    text = text.trim();
    return text || 'HTTP ' + res.status + ' ' + res.statusText;
  }

  /**
   * Calls the API with the token. Resolves to the JSON answer (null for 204), or a Blob with
   * {blob: true}. A 401 signs out (back to the login form, with the server's reason) and
   * rejects with SignedOut; any other error rejects with ApiError carrying the server's text.
   */
  async function api(method, path, body, opts) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      signOut('');
      throw new SignedOut('not signed in');
    }
    const headers = { Authorization: 'Bearer ' + token };
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'The server cannot be reached: ' + (e && e.message ? e.message : e));
    }
    if (res.status === 401) {
      const reason = await errorText(res);
      // Only if the token refused is still the one in use (not one replaced meanwhile).
      if (sessionStorage.getItem(TOKEN_KEY) === token) signOut(reason);
      throw new SignedOut(reason);
    }
    if (!res.ok) throw new ApiError(res.status, await errorText(res));
    if (opts && opts.blob) return res.blob();
    if (res.status === 204) return null;
    const text = await res.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new ApiError(res.status, 'The server answered something that is not JSON');
    }
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- page contexts

  let current = null;

  /** A page's lifetime: alive until another page replaces it. */
  function newContext() {
    if (current) disposeContext(current);
    current = { alive: true, timers: new Set(), urls: [] };
    return current;
  }

  function disposeContext(ctx) {
    ctx.alive = false;
    for (const t of ctx.timers) clearTimeout(t);
    ctx.timers.clear();
    for (const u of ctx.urls) URL.revokeObjectURL(u);
    ctx.urls = [];
  }

  /** Runs fn after ms, unless the page is gone by then. */
  function later(ctx, ms, fn) {
    const id = setTimeout(() => {
      ctx.timers.delete(id);
      if (ctx.alive) fn();
    }, ms);
    ctx.timers.add(id);
  }

  /** Reports an error of a page's work, unless it was a sign-out or the page is gone. */
  function fail(ctx, err) {
    if (err instanceof SignedOut) return;
    if (ctx && !ctx.alive) return;
    if (!(err instanceof ApiError)) console.error(err);
    showMessage(err && err.message ? err.message : String(err));
  }

  /** Like a promise's value, but null instead of an error (SignedOut still stops the caller). */
  async function orNull(promise) {
    try {
      return await promise;
    } catch (e) {
      if (e instanceof SignedOut) throw e;
      return null;
    }
  }

  function go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  // ---------------------------------------------------------------- sign in / out

  function showLogin(errorMessage) {
    $('shell').hidden = true;
    $('login-view').hidden = false;
    $('login-error').textContent = errorMessage || '';
    const input = $('login-token');
    input.value = '';
    input.focus();
  }

  function signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (current) disposeContext(current);
    current = null;
    closeOverlay();
    clearMessage();
    $('view').replaceChildren();
    showLogin(reason);
  }

  /**
   * Checks a token before keeping it: a cheap read every role may do. Only a 401 refuses it;
   * another error (a 500, say) is not the token's fault and shows on the page that follows.
   */
  async function login(event) {
    event.preventDefault();
    const token = $('login-token').value.trim();
    const error = $('login-error');
    if (!token) {
      error.textContent = 'Enter an API token (cairn.ID.SECRET).';
      return;
    }
    const button = $('login-go');
    button.disabled = true;
    error.textContent = '';
    try {
      const res = await fetch('/api/jobs', {
        headers: { Authorization: 'Bearer ' + token }, cache: 'no-store', credentials: 'omit',
      });
      if (res.status === 401) {
        error.textContent = await errorText(res);
        return;
      }
    } catch (e) {
      error.textContent = 'The server cannot be reached: ' + (e && e.message ? e.message : e);
      return;
    } finally {
      button.disabled = false;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $('login-token').value = '';
    if (!location.hash || location.hash === '#') location.hash = '#/';
    route();
  }

  // ---------------------------------------------------------------- overlay

  function openOverlay(url, caption) {
    const overlay = $('overlay');
    overlay.replaceChildren(
      el('figure', { class: 'overlay-figure' },
        el('img', { src: url, alt: caption }),
        el('figcaption', null, caption)),
      el('button', { type: 'button', class: 'btn overlay-close' }, 'Close'));
    overlay.hidden = false;
  }

  function closeOverlay() {
    const overlay = $('overlay');
    overlay.hidden = true;
    overlay.replaceChildren();
  }

  // ---------------------------------------------------------------- routing

  function parseHash() {
    const raw = location.hash.replace(/^#/, '') || '/';
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const query = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
    return { segs: path.split('/').filter(Boolean).map(decodeURIComponent), query };
  }

  function setNav(section) {
    for (const name of ['dashboard', 'vms', 'jobs', 'points', 'tokens']) {
      const link = $('nav-' + name);
      const on = name === section;
      link.classList.toggle('active', on);
      if (on) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  function setTitle(text) {
    document.title = text + ' · cairn';
  }

  /** Shows the page the hash names. */
  function route() {
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      if (current) disposeContext(current);
      current = null;
      showLogin($('login-error').textContent);
      return;
    }
    $('login-view').hidden = true;
    $('shell').hidden = false;
    const ctx = newContext();
    clearMessage();
    closeOverlay();
    const view = $('view');
    view.replaceChildren();
    window.scrollTo(0, 0);

    const { segs, query } = parseHash();
    const [first, second] = segs;
    let section = null;
    let render;
    if (!first) {
      section = 'dashboard';
      render = () => pageDashboard(ctx, view);
    } else if (first === 'vms' && !second) {
      section = 'vms';
      render = () => pageVms(ctx, view);
    } else if (first === 'jobs' && !second) {
      section = 'jobs';
      render = () => pageJobs(ctx, view);
    } else if (first === 'jobs' && second === 'new') {
      section = 'jobs';
      render = () => pageJobForm(ctx, view, null);
    } else if (first === 'jobs' && /^\d+$/.test(second)) {
      section = 'jobs';
      render = () => pageJobForm(ctx, view, Number(second));
    } else if (first === 'tasks' && /^\d+$/.test(second || '')) {
      section = 'jobs';
      render = () => pageTask(ctx, view, Number(second));
    } else if (first === 'points' && !second) {
      section = 'points';
      render = () => pagePoints(ctx, view, query.get('vm') || '');
    } else if (first === 'restore' && POINT_ID.test(second || '')) {
      section = 'points';
      render = () => pageRestore(ctx, view, second);
    } else if (first === 'files' && POINT_ID.test(second || '')) {
      section = 'points';
      render = () => pageFiles(ctx, view, second, query);
    } else if (first === 'tokens' && !second) {
      section = 'tokens';
      render = () => pageTokens(ctx, view);
    } else {
      render = () => pageNotFound(view);
    }
    setNav(section);
    Promise.resolve()
      .then(render)
      .catch((err) => {
        // A page that could not load says so in the banner; its "Loading…" goes.
        if (ctx.alive) view.querySelectorAll('.loading').forEach((n) => n.remove());
        fail(ctx, err);
      });
  }

  // ---------------------------------------------------------------- shared page parts

  /** A page's section with its heading; `actions` go to the heading's right. */
  function pageSection(id, title, actions) {
    setTitle(title);
    return el('section', { id, class: 'page' },
      el('header', { class: 'page-head' },
        el('h1', null, title),
        el('div', { class: 'page-actions' }, actions || null)));
  }

  function loading() {
    return el('p', { class: 'loading muted' }, 'Loading…');
  }

  /**
   * A table (in a box that scrolls sideways if it must): headers, rows (tr elements) in the
   * tbody, and when there are none a note in the tfoot (so `tbody tr` counts only real rows).
   */
  function table(id, headers, rows, emptyText) {
    const t = el('table', { id, class: 'table' },
      el('thead', null, el('tr', null, headers.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', null, rows));
    if (!rows.length) {
      t.append(el('tfoot', null, el('tr', { class: 'empty' },
        el('td', { colspan: headers.length }, emptyText || 'Nothing to show.'))));
    }
    return el('div', { class: 'table-wrap' }, t);
  }

  /** A row that follows its link when clicked anywhere but on a control of its own. */
  function linkRow(tr, hash) {
    tr.classList.add('clickable');
    tr.addEventListener('click', (e) => {
      if (e.target.closest('a, button, input, select, img')) return;
      go(hash);
    });
    return tr;
  }

  function card(id, href, label, value, detail, tone) {
    return el('a', { id, href, class: 'card' + (tone ? ' card-' + tone : '') },
      el('div', { class: 'card-label' }, label),
      el('div', { class: 'card-value' }, String(value)),
      el('div', { class: 'card-detail' }, detail));
  }

  function panel(title, ...children) {
    return el('div', { class: 'panel' }, el('h2', { class: 'panel-title' }, title), children);
  }

  function taskLink(task) {
    return el('a', { href: '#/tasks/' + task.id }, '#' + task.id);
  }

  function jobLabel(task, jobNames) {
    if (task.job_id === null || task.job_id === undefined) return el('span', { class: 'muted' }, task.kind === 'restore' ? 'restore' : '—');
    const name = jobNames.get(task.job_id);
    return name ? el('a', { href: '#/jobs/' + task.job_id }, name) : el('span', { class: 'muted' }, 'job #' + task.job_id);
  }

  function jobNameMap(jobs) {
    const names = new Map();
    for (const j of jobs || []) names.set(j.id, j.spec.name);
    return names;
  }

  /** The bar and text of a task's progress. */
  function progressText(p) {
    if (!p) return '';
    if (p.total > 0) {
      const pct = Math.min(100, Math.floor((p.done / p.total) * 100));
      return fmtBytes(p.done) + ' of ' + fmtBytes(p.total) + ' (' + pct + ' %)';
    }
    return p.done > 0 ? fmtBytes(p.done) : '';
  }

  // ---------------------------------------------------------------- dashboard

  async function pageDashboard(ctx, view) {
    const stamp = el('span', { class: 'muted', id: 'dashboard-updated' });
    const section = pageSection('page-dashboard', 'Dashboard', stamp);
    const body = el('div', { class: 'dash' }, loading());
    section.append(body);
    view.append(section);

    // Re-drawn only when the figures change (or a minute passed, for the relative times), so
    // a link under the pointer is not swapped away every 10 s.
    let lastSig = null;
    let lastDrawn = 0;
    const refresh = async () => {
      try {
        const [overview, jobs] = await Promise.all([api('GET', '/api/overview'), orNull(api('GET', '/api/jobs'))]);
        if (!ctx.alive) return;
        const names = jobNameMap(jobs);
        const sig = JSON.stringify([Object.assign({}, overview, { generated_ms: 0 }), [...names]]);
        if (sig !== lastSig || Date.now() - lastDrawn > 60000) {
          body.replaceChildren(...dashboardParts(overview, names));
          lastSig = sig;
          lastDrawn = Date.now();
        }
        // generated_ms is how long the server took, not a time: the figures are as of now.
        stamp.textContent = 'Figures as of ' + new Date().toLocaleTimeString()
          + ' (gathered in ' + Number(overview.generated_ms || 0).toFixed(1) + ' ms)';
      } catch (e) {
        if (e instanceof SignedOut) return;
        fail(ctx, e);
      }
      later(ctx, 10000, refresh);
    };
    await refresh();
  }

  function dashboardParts(o, names) {
    const jobs = o.jobs || {};
    const vms = o.vms || {};
    const problems = (jobs.warning || 0) + (jobs.failed || 0);
    const problemTone = jobs.failed > 0 ? 'failed' : (jobs.warning > 0 || jobs.overdue > 0) ? 'warning' : 'ok';
    const cards = el('div', { class: 'cards' },
      card('card-jobs-ok', '#/jobs', 'Jobs ok', jobs.ok || 0,
        'of ' + plural(jobs.total || 0, 'job') + (jobs.never_run ? ' · ' + jobs.never_run + ' never run' : ''),
        jobs.total && jobs.ok === jobs.total ? 'ok' : null),
      card('card-jobs-problems', '#/jobs', 'Jobs with problems', problems,
        (jobs.warning || 0) + ' warning · ' + (jobs.failed || 0) + ' failed · ' + (jobs.overdue || 0) + ' overdue',
        problemTone),
      card('card-vms', '#/vms', 'Virtual machines', vms.total || 0, 'on ' + plural(vms.hosts || 0, 'host')),
      card('card-stale', '#/vms', 'VMs without a recent point', vms.without_recent_point || 0,
        'no point in the last ' + (o.recent_hours || '?') + ' h', vms.without_recent_point ? 'warning' : 'ok'),
      card('card-points', '#/points', 'Restore points', (o.points && o.points.total) || 0, 'in the catalog'));

    const problemRows = (o.recent_problems || []).map((t) => linkRow(el('tr', { dataset: { task: t.id } },
      el('td', null, taskLink(t)),
      el('td', null, jobLabel(t, names)),
      el('td', null, badge(t.state)),
      el('td', null, timeSpan(t.ended || t.started || t.queued)),
      el('td', { class: 'wrap' }, t.error ? el('span', { class: 'error-text' }, t.error) : el('span', { class: 'muted' }, '—'))),
    '#/tasks/' + t.id));

    const staleRows = (o.stale_vms || []).map((v) => linkRow(el('tr', { dataset: { vm: v.uuid } },
      el('td', null, el('a', { href: '#/points?vm=' + enc(v.uuid) }, v.name)),
      el('td', { class: 'host' }, v.host),
      el('td', null, timeSpan(v.last_point, 'never'))),
    '#/points?vm=' + enc(v.uuid)));

    const taskRows = (o.recent_tasks || []).map((t) => {
      const started = parseTime(t.started);
      const ended = parseTime(t.ended);
      let duration;
      if (started !== null && ended !== null) duration = fmtDuration(ended - started);
      else if (t.state === 'running') duration = progressText(t.progress) || 'running';
      else duration = '—';
      return linkRow(el('tr', { dataset: { task: t.id } },
        el('td', null, taskLink(t)),
        el('td', null, jobLabel(t, names)),
        el('td', null, t.kind),
        el('td', null, t.trigger),
        el('td', null, badge(t.state)),
        el('td', null, timeSpan(t.started || t.queued)),
        el('td', null, duration)),
      '#/tasks/' + t.id);
    });

    return [
      cards,
      panel('Repository use', usageChart(o.usage || [])),
      el('div', { class: 'two-col' },
        panel('Recent problems', table('recent-problems', ['Task', 'Job', 'State', 'When', 'Error'], problemRows, 'No problems lately.')),
        panel('VMs without a recent point', table('stale-vms', ['VM', 'Host', 'Last point'], staleRows,
          'Every VM has a point from the last ' + (o.recent_hours || '?') + ' h.'))),
      panel('Recent tasks', table('recent-tasks', ['Task', 'Job', 'Kind', 'Trigger', 'State', 'Started', 'Duration'], taskRows, 'No tasks yet.')),
    ];
  }

  /** Round steps for an axis: 1, 2, 2.5 or 5 times a power of ten. */
  function niceStep(raw) {
    if (!(raw > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
  }

  /**
   * The repositories' stored bytes over time: one polyline per repository (a dot when it has a
   * single sample), byte ticks on the left, dates below, a legend under the plot. All SVG, made
   * node by node; colours come from the classes s0..s7.
   */
  function usageChart(usage) {
    const series = usage
      .map((u) => ({
        repository: u.repository,
        samples: (u.samples || [])
          .map((s) => ({ t: parseTime(s.at), bytes: Number(s.stored_bytes) || 0, points: s.points }))
          .filter((s) => s.t !== null)
          .sort((a, b) => a.t - b.t),
      }))
      .filter((s) => s.samples.length);

    const W = 960;
    const left = 84;
    const right = 24;
    const top = 16;
    const plotH = 220;
    const bottom = 36;
    const legendRow = 20;
    const H = top + plotH + bottom + Math.max(1, series.length) * legendRow + 8;
    const chart = svg('svg', {
      id: 'usage-chart', class: 'chart', viewBox: '0 0 ' + W + ' ' + H, width: '100%',
      role: 'img', 'aria-label': 'Stored bytes of each repository over time',
    });
    if (!series.length) {
      chart.setAttribute('viewBox', '0 0 ' + W + ' 80');
      chart.append(svg('text', { x: W / 2, y: 44, class: 'chart-empty', 'text-anchor': 'middle' },
        'No usage samples yet: they are taken as backups run.'));
      return chart;
    }

    let tMin = Infinity;
    let tMax = -Infinity;
    let maxBytes = 0;
    for (const s of series) {
      for (const p of s.samples) {
        tMin = Math.min(tMin, p.t);
        tMax = Math.max(tMax, p.t);
        maxBytes = Math.max(maxBytes, p.bytes);
      }
    }
    // A single instant gets a day around it, so its dots sit in the middle.
    if (tMax - tMin < 60000) {
      tMin -= 12 * 3600 * 1000;
      tMax += 12 * 3600 * 1000;
    }
    // The byte axis counts in one unit, in round steps.
    let unit = 0;
    while (unit < UNITS.length - 1 && maxBytes >= Math.pow(1024, unit + 1)) unit++;
    const scale = Math.pow(1024, unit);
    const step = niceStep(Math.max(maxBytes / scale, 1) / 4);
    const yTop = Math.max(step, Math.ceil(maxBytes / scale / step) * step) * scale;

    const plotW = W - left - right;
    const x = (t) => left + ((t - tMin) / (tMax - tMin)) * plotW;
    const y = (b) => top + plotH - (b / yTop) * plotH;

    const grid = svg('g', { class: 'chart-grid' });
    for (let v = 0; v <= yTop / scale + 1e-9; v += step) {
      const yy = y(v * scale).toFixed(1);
      grid.append(svg('line', { x1: left, x2: W - right, y1: yy, y2: yy }));
      const label = (Number.isInteger(v) ? v : v.toFixed(1)) + ' ' + UNITS[unit];
      grid.append(svg('text', { x: left - 8, y: yy, 'text-anchor': 'end', 'dominant-baseline': 'middle', class: 'chart-label' }, label));
    }
    const span = tMax - tMin;
    const dateOpts = span <= 2 * 86400 * 1000
      ? { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' }
      : { year: span > 300 * 86400 * 1000 ? 'numeric' : undefined, month: 'short', day: 'numeric' };
    const ticks = 5;
    for (let i = 0; i <= ticks; i++) {
      const t = tMin + (span * i) / ticks;
      const xx = x(t).toFixed(1);
      grid.append(svg('line', { x1: xx, x2: xx, y1: top + plotH, y2: top + plotH + 5, class: 'chart-tick' }));
      const anchor = i === 0 ? 'start' : i === ticks ? 'end' : 'middle';
      grid.append(svg('text', { x: xx, y: top + plotH + 20, 'text-anchor': anchor, class: 'chart-label' },
        new Date(t).toLocaleString(undefined, dateOpts)));
    }
    grid.append(svg('line', { x1: left, x2: W - right, y1: top + plotH, y2: top + plotH, class: 'chart-axis' }));
    grid.append(svg('line', { x1: left, x2: left, y1: top, y2: top + plotH, class: 'chart-axis' }));
    chart.append(grid);

    series.forEach((s, i) => {
      const tone = 's' + (i % 8);
      const last = s.samples[s.samples.length - 1];
      const what = s.repository + ': ' + fmtBytes(last.bytes) + ', ' + plural(last.points || 0, 'point') + ' (' + fmtTime(last.t) + ')';
      if (s.samples.length === 1) {
        chart.append(svg('circle', {
          cx: x(last.t).toFixed(1), cy: y(last.bytes).toFixed(1), r: 5, class: 'chart-dot ' + tone, 'data-repository': s.repository,
        }, svg('title', null, what)));
      } else {
        const pts = s.samples.map((p) => x(p.t).toFixed(1) + ',' + y(p.bytes).toFixed(1)).join(' ');
        chart.append(svg('polyline', { points: pts, class: 'chart-line ' + tone, 'data-repository': s.repository },
          svg('title', null, what)));
        chart.append(svg('circle', { cx: x(last.t).toFixed(1), cy: y(last.bytes).toFixed(1), r: 3, class: 'chart-dot ' + tone }));
      }
      const ly = top + plotH + bottom + i * legendRow + 10;
      chart.append(svg('g', { class: 'chart-legend' },
        svg('line', { x1: left, x2: left + 24, y1: ly, y2: ly, class: 'chart-line ' + tone }),
        svg('text', { x: left + 32, y: ly, 'dominant-baseline': 'middle', class: 'chart-legend-text' },
          s.repository + ' — ' + fmtBytes(last.bytes) + ', ' + plural(last.points || 0, 'point'))));
    });
    return chart;
  }

  // ---------------------------------------------------------------- VMs

  async function pageVms(ctx, view) {
    const filter = el('input', {
      id: 'vm-filter', type: 'search', class: 'input filter', placeholder: 'Filter by name, host or tag', 'aria-label': 'Filter VMs',
    });
    const count = el('span', { class: 'muted' });
    const section = pageSection('page-vms', 'Virtual machines', [count, filter]);
    const body = el('div', null, loading());
    section.append(body);
    view.append(section);

    const vms = await api('GET', '/api/vms');
    if (!ctx.alive) return;
    vms.sort((a, b) => a.name.localeCompare(b.name) || a.host.localeCompare(b.host));
    // Each row with what the filter matches against, lower-cased once.
    const rows = vms.map((v) => {
      const tr = el('tr', { dataset: { vm: v.uuid } },
        el('td', null, el('a', { href: '#/points?vm=' + enc(v.uuid), title: v.uuid }, v.name)),
        el('td', { class: 'host' }, v.host),
        el('td', null, el('span', { class: 'vm-state vm-state-' + (v.state === 'running' ? 'running' : 'other') }, v.state)),
        el('td', null, (v.tags || []).map((t) => el('span', { class: 'tag' }, t))),
        el('td', { title: v.method_reason || null }, v.method),
        el('td', null, timeSpan(v.last_point, 'never')),
        el('td', { class: 'num' }, String(v.points || 0)),
        el('td', null, v.last_boot ? badge(v.last_boot) : el('span', { class: 'muted' }, '—')));
      return { tr, haystack: [v.name, v.host, v.uuid, ...(v.tags || [])].join('\n').toLowerCase() };
    });
    body.replaceChildren(
      table('vm-table', ['Name', 'Host', 'State', 'Tags', 'Method', 'Last point', 'Points', 'Last boot check'], rows.map((r) => r.tr),
        'No VMs on the server\'s hosts (or none could be listed yet).'),
      el('p', { class: 'hint' }, 'Hover a method for why the VM qualifies for it. The name lists its restore points.'));

    const apply = () => {
      const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      let shown = 0;
      for (const { tr, haystack } of rows) {
        const match = words.every((w) => haystack.includes(w));
        tr.hidden = !match;
        if (match) shown++;
      }
      count.textContent = words.length ? shown + ' of ' + rows.length : plural(rows.length, 'VM');
    };
    filter.addEventListener('input', apply);
    apply();
  }

  // ---------------------------------------------------------------- jobs

  function vmSummary(spec) {
    const v = spec.vms || {};
    let text;
    if (v.all) text = 'all VMs';
    else if (v.tags && v.tags.length) text = 'tagged ' + v.tags.join(', ');
    else {
      const names = v.names || [];
      text = names.length <= 3 ? names.join(', ') : names.slice(0, 3).join(', ') + ' +' + (names.length - 3) + ' more';
    }
    const hosts = spec.hosts || [];
    return el('span', { title: [...(v.names || []), ...(hosts.length ? ['hosts: ' + hosts.join(', ')] : [])].join('\n') || null },
      text, hosts.length ? el('span', { class: 'muted' }, ' on ' + plural(hosts.length, 'host')) : null);
  }

  async function pageJobs(ctx, view) {
    const newButton = el('button', { id: 'new-job', type: 'button', class: 'btn btn-primary', onclick: () => go('#/jobs/new') }, 'New job');
    const section = pageSection('page-jobs', 'Jobs', newButton);
    const body = el('div', null, loading());
    section.append(body);
    view.append(section);

    // Re-read every 10 s (a run's state changes under the reader), re-drawn only on a change
    // or once a minute, so a button under the pointer is not replaced for nothing.
    let lastSig = null;
    let lastDrawn = 0;
    const draw = async () => {
      const jobs = await api('GET', '/api/jobs');
      if (!ctx.alive) return;
      const sig = JSON.stringify(jobs);
      if (sig !== lastSig || Date.now() - lastDrawn > 60000) {
        body.replaceChildren(jobTable(ctx, jobs, draw));
        lastSig = sig;
        lastDrawn = Date.now();
      }
    };
    const tick = async () => {
      try {
        await draw();
      } catch (e) {
        if (e instanceof SignedOut) return;
        fail(ctx, e);
      }
      later(ctx, 10000, tick);
    };
    await tick();
  }

  function jobTable(ctx, jobs, reload) {
    jobs.sort((a, b) => a.spec.name.localeCompare(b.spec.name));
    const rows = jobs.map((job) => {
      const spec = job.spec;
      const last = job.last_task;
      const run = el('button', { type: 'button', class: 'btn btn-small run-job', title: 'Run this job now' }, 'Run now');
      run.addEventListener('click', async () => {
        run.disabled = true;
        try {
          const task = await api('POST', '/api/jobs/' + job.id + '/run');
          if (ctx.alive) go('#/tasks/' + task.id);
        } catch (e) {
          run.disabled = false;
          fail(ctx, e);
        }
      });
      const del = el('button', { type: 'button', class: 'btn btn-small btn-danger delete-job' }, 'Delete');
      del.addEventListener('click', async () => {
        if (!confirm('Delete job "' + spec.name + '"? Its tasks stay in the history; its restore points stay in the repository.')) return;
        del.disabled = true;
        try {
          await api('DELETE', '/api/jobs/' + job.id);
          if (ctx.alive) await reload();
        } catch (e) {
          del.disabled = false;
          fail(ctx, e);
        }
      });
      return el('tr', { dataset: { job: spec.name, jobId: job.id } },
        el('td', null, el('a', { href: '#/jobs/' + job.id, class: 'strong' }, spec.name),
          el('div', { class: 'muted small', title: spec.repository }, spec.repository)),
        el('td', null, vmSummary(spec)),
        el('td', null, spec.schedule ? el('code', null, spec.schedule) : el('span', { class: 'muted' }, 'manual only'),
          spec.enabled ? null : [' ', badge('disabled', 'A disabled job keeps its schedule but does not run on it')]),
        el('td', null, spec.enabled && job.next_run ? timeSpan(job.next_run) : el('span', { class: 'muted' }, '—')),
        el('td', null, last
          ? el('a', { href: '#/tasks/' + last.id, class: 'task-link', title: 'Task #' + last.id }, badge(last.state),
            ' ', el('span', { class: 'muted small' }, fmtRelative(last.ended || last.started || last.queued)))
          : el('span', { class: 'muted' }, 'never run')),
        el('td', null, timeSpan(job.last_good, 'never')),
        el('td', { class: 'actions' },
          run,
          el('button', { type: 'button', class: 'btn btn-small edit-job', onclick: () => go('#/jobs/' + job.id) }, 'Edit'),
          del));
    });
    return table('job-table', ['Name', 'VMs', 'Schedule', 'Next run', 'Last run', 'Last good', ''], rows,
      'No jobs yet: "New job" defines one.');
  }

  // ---------------------------------------------------------------- job form

  function splitList(text) {
    return text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  }

  function field(label, input, hint) {
    return el('div', { class: 'field' },
      el('label', { for: input.id }, label),
      input,
      hint ? el('div', { class: 'hint' }, hint) : null);
  }

  function checkField(input, label, hint) {
    return el('div', { class: 'field field-check' },
      el('label', { class: 'check' }, input, ' ', label),
      hint ? el('div', { class: 'hint' }, hint) : null);
  }

  function textInput(id, value, attrs) {
    return el('input', Object.assign({ id, type: 'text', class: 'input', value: value || '', spellcheck: 'false' }, attrs || {}));
  }

  function numberInput(id, value, min, max) {
    return el('input', { id, type: 'number', class: 'input input-num', min, max, step: 1, value: value === null || value === undefined ? '' : String(value) });
  }

  function select(id, options, value) {
    return el('select', { id, class: 'input', value },
      options.map(([v, label]) => el('option', { value: v }, label)));
  }

  const KEEPS = [
    ['last', 'Last', 'the newest N points'],
    ['hourly', 'Hourly', 'the newest point of each of the last N hours'],
    ['daily', 'Daily', 'of the last N days'],
    ['weekly', 'Weekly', 'of the last N weeks'],
    ['monthly', 'Monthly', 'of the last N months'],
    ['yearly', 'Yearly', 'of the last N years'],
  ];

  async function pageJobForm(ctx, view, id) {
    const editing = id !== null;
    const section = pageSection('page-job-form', editing ? 'Edit job' : 'New job');
    const body = el('div', null, loading());
    section.append(body);
    view.append(section);

    // The host list is helpful, not required: without it the job covers all hosts.
    const [job, hostInfo] = await Promise.all([
      editing ? api('GET', '/api/jobs/' + id) : Promise.resolve(null),
      api('GET', '/api/hosts').catch((e) => {
        if (e instanceof SignedOut) throw e;
        fail(ctx, e);
        return { hosts: [], restore_storage: [] };
      }),
    ]);
    if (!ctx.alive) return;
    if (editing) {
      section.querySelector('h1').textContent = 'Edit job ' + job.spec.name;
      setTitle('Edit job ' + job.spec.name);
    }
    const spec = job ? job.spec : {
      name: '', vms: { all: false, names: [], tags: [] }, hosts: [], repository: '', password_file: null,
      method: 'auto', schedule: 'daily', enabled: true, retention: null, verify_boot: false, per_host: 1, notify: null,
      copies: [],
    };
    const vms = spec.vms || {};
    const retention = spec.retention || {};
    const notify = spec.notify || {};

    // Which VMs: one of three ways. Typing in a way's box picks that way.
    const way = vms.all ? 'all' : (vms.tags && vms.tags.length) ? 'tags' : 'names';
    const radio = (value, label) => el('label', { class: 'check' },
      el('input', { type: 'radio', name: 'job-select', id: 'job-select-' + value, value, checked: way === value }), ' ', label);
    const namesInput = textInput('job-vm-names', (vms.names || []).join(', '), { placeholder: 'web01, db01, 4a1e…' });
    const tagsInput = textInput('job-vm-tags', (vms.tags || []).join(', '), { placeholder: 'prod, nightly' });
    namesInput.addEventListener('input', () => { $('job-select-names').checked = true; });
    tagsInput.addEventListener('input', () => { $('job-select-tags').checked = true; });

    // Hosts: the server's list, plus any the job names that the list no longer has.
    const known = hostInfo.hosts || [];
    const hostList = [...known, ...(spec.hosts || []).filter((h) => !known.includes(h))];
    const hostBoxes = hostList.length
      ? el('div', { class: 'check-list' }, hostList.map((h) => el('label', { class: 'check' },
        el('input', { type: 'checkbox', class: 'job-host', value: h, checked: (spec.hosts || []).includes(h) }), ' ', el('code', null, h),
        known.includes(h) ? null : el('span', { class: 'error-text' }, ' (not in the server\'s host list)'))))
      : el('p', { class: 'muted' }, 'The server lists no hosts.');

    const save = el('button', { id: 'job-save', type: 'submit', class: 'btn btn-primary' }, editing ? 'Save job' : 'Create job');
    const form = el('form', { id: 'job-form', class: 'form', noValidate: true, autocomplete: 'off' },
      el('fieldset', null, el('legend', null, 'Job'),
        field('Name', textInput('job-name', spec.name, { maxlength: 64, placeholder: 'nightly-prod' }), 'Letters, digits, - _ . (up to 64).'),
        checkField(el('input', { type: 'checkbox', id: 'job-enabled', checked: spec.enabled !== false }), 'Enabled',
          'A disabled job keeps its schedule but does not run on it (it still runs when asked).')),
      el('fieldset', null, el('legend', null, 'Virtual machines'),
        el('div', { class: 'field', role: 'radiogroup', 'aria-label': 'Which VMs' },
          el('div', { class: 'way' }, radio('names', 'By name or UUID'), namesInput),
          el('div', { class: 'way' }, radio('tags', 'By tag'), tagsInput),
          el('div', { class: 'way' }, radio('all', 'All VMs of the hosts'))),
        el('div', { class: 'hint' }, 'Names and tags are comma-separated. Tags and "all" are looked up when the job runs.'),
        el('div', { class: 'field' }, el('div', { class: 'label' }, 'Hosts'), hostBoxes,
          el('div', { class: 'hint' }, 'None checked: all of the server\'s hosts.'))),
      el('fieldset', null, el('legend', null, 'Repository'),
        field('Repository', textInput('job-repository', spec.repository, { placeholder: '/srv/cairn or s3://bucket/prefix' }),
          'An absolute folder of the server, or an s3:// or az:// URL.'),
        field('Password file', textInput('job-password-file', spec.password_file || '', { placeholder: '/etc/cairn/repo.pass' }),
          'For an encrypted repository: a file in the server\'s secrets folder. Empty: none.'),
        field('Offsite copies', el('textarea', { id: 'job-copies', rows: 2, class: 'input',
          placeholder: 's3://offsite/site-a /etc/cairn/offsite.pass' },
        (spec.copies || []).map((c) => c.repository + (c.password_file ? ' ' + c.password_file : '')).join('\n')),
        'One repository per line (made beforehand with cairn init), then its password file if it is encrypted. '
          + 'After each run its new points are copied there; only the blocks a copy lacks travel.')),
      el('fieldset', null, el('legend', null, 'Backup'),
        field('Method', select('job-method', [
          ['auto', 'auto: app-consistent with a guest agent, else saved-state'],
          ['app-consistent', 'app-consistent (guest file systems frozen)'],
          ['saved-state', 'saved-state (memory saved, VM paused briefly)'],
          ['crash-consistent', 'crash-consistent (disks as they are)'],
        ], spec.method || 'auto')),
        checkField(el('input', { type: 'checkbox', id: 'job-verify-boot', checked: !!spec.verify_boot }), 'Verify boot',
          'Boot each new point in a sandbox on its host and check it comes up (with a screenshot).'),
        field('VMs at once per host', numberInput('job-per-host', spec.per_host || 1, 1, 16), '1 to 16.')),
      el('fieldset', null, el('legend', null, 'Schedule'),
        field('Schedule', textInput('job-schedule', spec.schedule || '', { placeholder: 'daily' }),
          el('span', null, 'Examples: ', el('code', null, 'daily'), ', ', el('code', null, 'hourly'), ', ',
            el('code', null, 'mon..fri 22:00'), ', ', el('code', null, 'sat *-1..7 03:00'), ' (first Saturday), ',
            el('code', null, '*:0/15'), ' (every quarter hour), or cron ', el('code', null, '0 3 * * *'),
            '. In the server\'s time. Empty: only when run by hand.'))),
      el('fieldset', null, el('legend', null, 'Retention'),
        el('div', { class: 'keep-grid' }, KEEPS.map(([k, label, hint]) =>
          field(label, numberInput('job-keep-' + k, retention['keep_' + k] || '', 0, 100000), hint))),
        el('div', { class: 'hint' }, 'After each run, the points of its VMs that none of these keep are forgotten. All empty: nothing is forgotten.')),
      el('fieldset', null, el('legend', null, 'Notifications'),
        field('Mail to', textInput('job-mail-to', notify.mail_to || '', { type: 'email', placeholder: 'ops@example.com' })),
        field('Webhook', textInput('job-webhook', notify.webhook || '', { type: 'url', placeholder: 'https://hooks.example.com/cairn' }),
          'Receives {"job": NAME, "task": TASK} as a JSON POST.'),
        field('When', select('job-notify-when', [['always', 'after every run'], ['problems', 'only runs that did not end ok']], notify.when || 'always'))),
      el('div', { class: 'form-actions' }, save, el('a', { href: '#/jobs', class: 'btn' }, 'Cancel')));

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const body = jobSpecOfForm();
      save.disabled = true;
      try {
        if (editing) await api('PUT', '/api/jobs/' + id, body);
        else await api('POST', '/api/jobs', body);
        if (ctx.alive) go('#/jobs');
      } catch (err) {
        // The form stays as typed; the server says what to fix.
        fail(ctx, err);
        window.scrollTo(0, 0);
      } finally {
        save.disabled = false;
      }
    });

    const parts = [form];
    if (editing) parts.push(el('div', { id: 'job-tasks' }));
    body.replaceChildren(...parts);
    if (editing) jobTasks(ctx, id, $('job-tasks'));
  }

  /** The JobSpec the form says: exactly the fields the server takes. */
  function jobSpecOfForm() {
    const value = (id) => $(id).value.trim();
    const count = (id) => {
      const n = parseInt($(id).value, 10);
      return isNaN(n) ? 0 : n;
    };
    const way = (document.querySelector('input[name="job-select"]:checked') || { value: 'names' }).value;
    const retention = {};
    let keepsAny = false;
    for (const [k] of KEEPS) {
      retention['keep_' + k] = Math.max(0, count('job-keep-' + k));
      if (retention['keep_' + k] > 0) keepsAny = true;
    }
    const mailTo = value('job-mail-to');
    const webhook = value('job-webhook');
    const perHost = parseInt($('job-per-host').value, 10);
    return {
      name: value('job-name'),
      vms: {
        all: way === 'all',
        names: way === 'names' ? splitList($('job-vm-names').value) : [],
        tags: way === 'tags' ? splitList($('job-vm-tags').value) : [],
      },
      hosts: [...document.querySelectorAll('input.job-host:checked')].map((b) => b.value),
      repository: value('job-repository'),
      password_file: value('job-password-file') || null,
      method: $('job-method').value,
      schedule: value('job-schedule') || null,
      enabled: $('job-enabled').checked,
      retention: keepsAny ? retention : null,
      verify_boot: $('job-verify-boot').checked,
      per_host: isNaN(perHost) ? 1 : perHost,
      notify: mailTo || webhook ? { mail_to: mailTo || null, webhook: webhook || null, when: $('job-notify-when').value } : null,
      copies: $('job-copies').value.split('\n').map((l) => l.trim()).filter(Boolean).map((l) => {
        const [repository, passwordFile] = l.split(/\s+/, 2);
        return { repository, password_file: passwordFile || null };
      }),
    };
  }

  /** A job's recent runs, under its form. */
  async function jobTasks(ctx, id, box) {
    try {
      const tasks = await api('GET', '/api/tasks?job=' + id + '&limit=20');
      if (!ctx.alive) return;
      const rows = tasks.map((t) => linkRow(el('tr', { dataset: { task: t.id } },
        el('td', null, taskLink(t)),
        el('td', null, t.trigger),
        el('td', null, t.requested_by),
        el('td', null, badge(t.state)),
        el('td', null, timeSpan(t.started || t.queued)),
        el('td', null, t.started && t.ended ? fmtDuration(parseTime(t.ended) - parseTime(t.started)) : '—')),
      '#/tasks/' + t.id));
      box.replaceChildren(panel('Recent runs', table('job-task-table', ['Task', 'Trigger', 'By', 'State', 'Started', 'Duration'], rows, 'Never run.')));
    } catch (e) {
      fail(ctx, e);
    }
  }

  // ---------------------------------------------------------------- task

  async function pageTask(ctx, view, id) {
    const section = pageSection('page-task', 'Task #' + id);
    const stateBadge = el('span', { id: 'task-state', class: 'badge badge-neutral' }, '…');
    const cancel = el('button', { id: 'task-cancel', type: 'button', class: 'btn btn-danger', hidden: true }, 'Cancel task');
    section.querySelector('.page-actions').append(cancel);
    const facts = el('dl', { class: 'facts' });
    const step = el('span', { id: 'task-step' });
    const bar = el('progress', { id: 'task-progress', class: 'progress', max: 1 });
    const barText = el('span', { id: 'task-progress-text', class: 'muted' });
    const progressBox = el('div', { class: 'progress-box', hidden: true },
      el('div', { class: 'progress-head' }, step, barText), bar);
    const error = el('div', { id: 'task-error', class: 'task-error', hidden: true });
    const result = el('div', { id: 'task-result-box' });
    const log = el('ol', { id: 'task-log', class: 'log' });
    section.append(
      el('div', { class: 'panel task-head' }, el('div', { class: 'task-state-line' }, stateBadge), facts, progressBox),
      error,
      result,
      panel('Log', log));
    view.append(section);

    let lastSeq = 0;
    let jobName = null;
    let resultDrawn = false;

    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      cancel.textContent = 'Cancelling…';
      try {
        await api('POST', '/api/tasks/' + id + '/cancel');
      } catch (e) {
        cancel.disabled = false;
        cancel.textContent = 'Cancel task';
        fail(ctx, e);
      }
    });

    const draw = (task) => {
      stateBadge.textContent = task.state;
      stateBadge.className = 'badge badge-' + (TONES[task.state] || 'neutral');
      const active = task.state === 'queued' || task.state === 'running';
      cancel.hidden = !active;
      if (!active) cancel.disabled = true;

      const started = parseTime(task.started);
      const ended = parseTime(task.ended);
      const f = [
        ['Kind', task.kind],
        ['Job', task.job_id === null || task.job_id === undefined ? null
          : el('a', { href: '#/jobs/' + task.job_id }, jobName || 'job #' + task.job_id)],
        ['Trigger', task.trigger],
        ['Requested by', task.requested_by],
        ['Queued', timeFull(task.queued)],
        ['Started', timeFull(task.started)],
        ['Ended', task.ended ? timeFull(task.ended) : null],
        ['Duration', started !== null ? fmtDuration((ended !== null ? ended : Date.now()) - started) : null],
      ];
      facts.replaceChildren(...f.filter(([, v]) => v !== null && v !== undefined)
        .flatMap(([k, v]) => [el('dt', null, k), el('dd', null, v)]));

      const p = task.progress;
      progressBox.hidden = !p && !active;
      step.textContent = p && p.step ? p.step : (task.state === 'queued' ? 'waiting for its turn' : '');
      if (p && p.total > 0) {
        bar.max = p.total;
        bar.value = Math.min(p.done, p.total);
      } else if (active) {
        bar.removeAttribute('value'); // indeterminate until a step says how much there is
      } else {
        bar.max = 1;
        bar.value = task.state === 'ok' ? 1 : 0;
      }
      barText.textContent = progressText(p);

      error.hidden = !task.error;
      error.textContent = task.error || '';

      if (!active && !resultDrawn) {
        resultDrawn = true;
        result.replaceChildren(...taskResult(task));
      }
    };

    const appendLog = (lines) => {
      if (!lines.length) return;
      // Follow the end of the log only if the reader is already there.
      const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
      for (const l of lines) {
        if (l.seq <= lastSeq) continue;
        lastSeq = l.seq;
        log.append(el('li', { dataset: { seq: l.seq } },
          el('time', { class: 'log-time', datetime: l.at, title: fmtTime(l.at) }, timeOfDay(l.at)),
          el('span', { class: 'log-line' }, l.line)));
      }
      if (atEnd) log.scrollTop = log.scrollHeight;
    };

    const task = await api('GET', '/api/tasks/' + id);
    if (!ctx.alive) return;
    if (task.job_id !== null && task.job_id !== undefined) {
      const job = await orNull(api('GET', '/api/jobs/' + task.job_id));
      if (job) jobName = job.spec.name;
    }
    if (!ctx.alive) return;
    setTitle('Task #' + id + (jobName ? ' (' + jobName + ')' : ''));
    draw(task);
    appendLog(await api('GET', '/api/tasks/' + id + '/log?after=0'));

    // Polled each second while it may still change; once it has ended, the log is read once
    // more (lines written as it ended) and the polling stops.
    let busy = task.state === 'queued' || task.state === 'running';
    const poll = async () => {
      try {
        const t = await api('GET', '/api/tasks/' + id);
        if (!ctx.alive) return;
        const lines = await api('GET', '/api/tasks/' + id + '/log?after=' + lastSeq);
        if (!ctx.alive) return;
        appendLog(lines);
        draw(t);
        busy = t.state === 'queued' || t.state === 'running';
      } catch (e) {
        if (e instanceof SignedOut) return;
        fail(ctx, e);
      }
      if (busy) later(ctx, 1000, poll);
    };
    if (busy) later(ctx, 1000, poll);
  }

  function timeOfDay(t) {
    const ms = parseTime(t);
    return ms === null ? '' : new Date(ms).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  /** A JSON value as text for a key/value table. */
  function valueText(v) {
    if (v === null || v === undefined) return '—';
    if (typeof v === 'string') return v;
    if (typeof v === 'number' || typeof v === 'boolean') return String(v);
    return JSON.stringify(v, null, 2);
  }

  function keyValueTable(id, obj) {
    const rows = Object.entries(obj).map(([k, v]) => el('tr', null,
      el('th', { scope: 'row' }, k),
      el('td', null, typeof v === 'object' && v !== null ? el('pre', { class: 'json' }, valueText(v)) : valueText(v))));
    return el('div', { class: 'table-wrap' }, el('table', { id, class: 'table table-kv' }, el('tbody', null, rows)));
  }

  /** An ended task's outcome: per VM for a backup, key by key for anything else. */
  function taskResult(task) {
    const r = task.result;
    if (!r || typeof r !== 'object') return [];
    if (task.kind === 'backup' && Array.isArray(r.vms)) {
      const rows = r.vms.map((v) => {
        const boot = v.boot || null;
        let bootCell;
        if (!boot) bootCell = el('span', { class: 'muted' }, 'not checked');
        else if (boot.error) bootCell = el('span', { class: 'error-text' }, boot.error);
        else bootCell = [badge(boot.verdict, boot.reason), boot.reason ? el('div', { class: 'muted small' }, boot.reason) : null];
        const vmRef = v.name || v.vm;
        return el('tr', { dataset: v.vm ? { vm: v.vm } : null },
          el('td', null, vmRef ? el('a', { href: '#/points?vm=' + enc(vmRef) }, v.vm) : '—'),
          el('td', { class: 'host' }, v.host || '—'),
          el('td', null, badge(v.ok ? 'ok' : 'failed')),
          el('td', null, v.point ? el('code', { title: valueText(v.point) }, shortId(v.point)) : '—'),
          el('td', null, v.chain || '—'),
          el('td', null, v.method || '—'),
          el('td', { class: 'num' }, v.read_bytes !== null && v.read_bytes !== undefined ? fmtBytes(v.read_bytes) : '—'),
          el('td', null, bootCell),
          el('td', { class: 'wrap' }, v.error ? el('span', { class: 'error-text' }, v.error) : ''));
      });
      const parts = [table('task-result', ['VM', 'Host', 'Result', 'Point', 'Chain', 'Method', 'Read', 'Boot check', 'Error'], rows, 'No VM was backed up.')];
      if (r.retention !== undefined && r.retention !== null) {
        const ret = r.retention;
        const text = typeof ret === 'object' && ret.forgotten !== undefined
          ? 'Retention: ' + plural(ret.forgotten, 'restore point') + ' forgotten.'
          : 'Retention: ' + valueText(ret);
        parts.push(el('p', { class: 'retention-note' }, text));
      }
      for (const c of Array.isArray(r.copies) ? r.copies : []) {
        parts.push(el('p', { class: 'retention-note copy-note' }, 'Offsite copy to ', el('code', null, String(c.repository)), ': ',
          c.ok
            ? plural(c.points, 'point') + ' copied, ' + fmtBytes(c.raw_bytes_sent || 0) + ' sent (' + (c.blocks_present || 0) + ' blocks were there already).'
            : el('span', { class: 'error-text' }, 'failed: ' + String(c.error))));
      }
      return [panel('Result', parts)];
    }
    return [panel('Result', keyValueTable('task-result', r))];
  }

  // ---------------------------------------------------------------- points

  // Points seen lately, by ID: the restore and file pages start from one.
  const pointCache = new Map();

  /** A point's row, from what was listed or else from the catalog. */
  async function findPoint(id) {
    if (pointCache.has(id)) return pointCache.get(id);
    const p = await api('GET', '/api/points/' + enc(id));
    pointCache.set(p.id, p);
    return p;
  }

  // What a thumbnail shows when its screenshot cannot be had (a constant, not API text).
  const NO_SHOT = 'data:image/svg+xml,' + encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="60" viewBox="0 0 96 60">'
    + '<rect width="96" height="60" fill="#f3f4f6"/>'
    + '<text x="48" y="34" font-family="sans-serif" font-size="10" fill="#6b7280" text-anchor="middle">unavailable</text></svg>');

  /** Fetches screenshots a few at a time (each needs the token, so no plain <img src>). */
  function screenshotLoader(ctx) {
    const queue = [];
    let running = 0;
    const next = () => {
      while (running < 4 && queue.length && ctx.alive) {
        const [img, id] = queue.shift();
        running++;
        api('GET', '/api/points/' + id + '/screenshot', undefined, { blob: true })
          .then((blob) => {
            if (!ctx.alive) return;
            const url = URL.createObjectURL(blob);
            ctx.urls.push(url);
            img.src = url;
            img.classList.remove('pending');
          })
          .catch((e) => {
            if (e instanceof SignedOut) {
              queue.length = 0;
              return;
            }
            img.classList.remove('pending');
            img.classList.add('broken');
            img.alt = 'no screenshot';
            img.title = 'Screenshot unavailable: ' + e.message;
            img.src = NO_SHOT;
          })
          .finally(() => {
            running--;
            next();
          });
      }
    };
    return (img, id) => {
      queue.push([img, id]);
      next();
    };
  }

  async function pagePoints(ctx, view, vm) {
    const vmInput = el('input', { id: 'points-vm', type: 'search', class: 'input filter', placeholder: 'VM name or UUID', value: vm, 'aria-label': 'VM' });
    const filterForm = el('form', { class: 'inline-form', noValidate: true },
      vmInput, el('button', { type: 'submit', class: 'btn' }, 'Show'),
      vm ? el('a', { href: '#/points', class: 'btn' }, 'All VMs') : null);
    filterForm.addEventListener('submit', (e) => {
      e.preventDefault();
      const v = vmInput.value.trim();
      go(v ? '#/points?vm=' + enc(v) : '#/points');
    });
    const section = pageSection('page-points', 'Restore points', filterForm);
    const body = el('div', null, loading());
    section.append(body);
    view.append(section);

    let limit = 200;
    const load = async () => {
      const points = await api('GET', '/api/points?limit=' + limit + (vm ? '&vm=' + enc(vm) : ''));
      if (!ctx.alive) return;
      for (const p of points) pointCache.set(p.id, p);
      if (vm) {
        const name = points.length ? points[0].name : vm;
        section.querySelector('h1').textContent = 'Restore points of ' + name;
        setTitle('Points of ' + name);
      }
      const shot = screenshotLoader(ctx);
      const rows = points.map((p) => {
        let shotCell = el('span', { class: 'muted' }, '—');
        if (p.screenshot) {
          const img = el('img', { class: 'boot-shot pending', alt: 'boot screenshot of ' + p.name, title: 'Open the boot screenshot', tabindex: 0 });
          const open = () => {
            if (img.src && !img.classList.contains('broken')) openOverlay(img.src, p.name + ' — ' + fmtTime(p.time) + (p.boot_verdict ? ' — boot ' + p.boot_verdict : ''));
          };
          img.addEventListener('click', open);
          img.addEventListener('keydown', (e) => {
            if (e.key === 'Enter' || e.key === ' ') {
              e.preventDefault();
              open();
            }
          });
          shot(img, p.id);
          shotCell = img;
        }
        return el('tr', { dataset: { point: p.id } },
          el('td', null, el('time', { datetime: p.time, title: fmtTime(p.time) }, fmtTimeShort(p.time)), el('div', { class: 'muted small' }, fmtRelative(p.time))),
          el('td', null, el('a', { href: '#/points?vm=' + enc(p.vm_uuid || p.name), title: p.vm_uuid || null }, p.name),
            el('div', { class: 'muted small' }, el('code', { title: p.id }, shortId(p.id)))),
          el('td', { class: 'host' }, p.host || '—'),
          el('td', null, p.chain || '—', el('div', { class: 'muted small' }, p.method || '')),
          el('td', { class: 'num' }, p.read_bytes !== null && p.read_bytes !== undefined ? fmtBytes(p.read_bytes) : '—'),
          el('td', null, p.boot_verdict ? badge(p.boot_verdict, p.boot_reason) : el('span', { class: 'muted' }, 'not checked'),
            p.boot_reason ? el('div', { class: 'muted small clip', title: p.boot_reason }, p.boot_reason) : null),
          el('td', null, shotCell),
          el('td', { class: 'actions' }, el('div', { class: 'stack' },
            el('button', { type: 'button', class: 'btn btn-small btn-primary restore-point', onclick: () => go('#/restore/' + p.id) }, 'Restore'),
            el('button', { type: 'button', class: 'btn btn-small browse-point', onclick: () => go('#/files/' + p.id) }, 'Browse files'))));
      });
      const parts = [table('point-table', ['Time', 'VM', 'Host', 'Backup', 'Read', 'Boot check', 'Screen', ''], rows,
        vm ? 'No restore points of this VM.' : 'No restore points yet.')];
      if (points.length >= limit) {
        parts.push(el('p', null, el('button', {
          type: 'button', class: 'btn', onclick: async (e) => {
            e.currentTarget.disabled = true;
            limit += 200;
            try {
              await load();
            } catch (err) {
              fail(ctx, err);
            }
          },
        }, 'Show older points')));
      }
      body.replaceChildren(...parts);
    };
    await load();
  }

  /** A point's facts, as the restore and file pages show them on top. */
  function pointFacts(point, id) {
    if (!point) {
      return el('div', { class: 'panel point-facts' },
        el('p', null, 'Restore point ', el('code', null, id)),
        el('p', { class: 'muted' }, 'Its details are not among the newest points of the catalog.'));
    }
    return el('div', { class: 'panel point-facts' },
      el('dl', { class: 'facts' },
        el('dt', null, 'VM'), el('dd', null, el('a', { href: '#/points?vm=' + enc(point.vm_uuid || point.name) }, point.name)),
        el('dt', null, 'Time'), el('dd', null, timeFull(point.time)),
        el('dt', null, 'Host'), el('dd', null, point.host || '—'),
        el('dt', null, 'Boot check'), el('dd', null, point.boot_verdict ? badge(point.boot_verdict, point.boot_reason) : el('span', { class: 'muted' }, 'not checked'),
          point.boot_reason ? el('span', { class: 'muted' }, ' ' + point.boot_reason) : null),
        el('dt', null, 'Backup'), el('dd', null, [point.chain, point.method].filter(Boolean).join(', ') || '—'),
        el('dt', null, 'Repository'), el('dd', null, el('code', null, point.repository)),
        el('dt', null, 'Point'), el('dd', null, el('code', null, point.id))));
  }

  // ---------------------------------------------------------------- restore

  async function pageRestore(ctx, view, id) {
    const section = pageSection('page-restore', 'Restore');
    const body = el('div', null, loading());
    section.append(body);
    view.append(section);

    const [point, hostInfo] = await Promise.all([orNull(findPoint(id)), api('GET', '/api/hosts')]);
    if (!ctx.alive) return;
    if (point) {
      section.querySelector('h1').textContent = 'Restore ' + point.name;
      setTitle('Restore ' + point.name);
    }
    const hosts = hostInfo.hosts || [];
    const storages = hostInfo.restore_storage || [];
    const vmName = point ? point.name : 'NAME';

    const kind = (value, title, text) => el('label', { class: 'choice' },
      el('input', { type: 'radio', name: 'restore-kind', id: 'restore-kind-' + value, value, checked: value === 'vm' }),
      el('span', null, el('strong', null, title), el('span', { class: 'muted' }, text)));

    const hostSelect = el('select', { id: 'restore-host', class: 'input', disabled: !hosts.length },
      hosts.length ? hosts.map((h) => el('option', { value: h }, h)) : el('option', { value: '' }, 'the server lists no hosts'));
    if (point && hosts.includes(point.host)) hostSelect.value = point.host;
    const storageSelect = el('select', { id: 'restore-storage', class: 'input', disabled: !storages.length },
      storages.length ? storages.map((s) => el('option', { value: s }, s)) : el('option', { value: '' }, 'the server has no restore folders'));
    const nameInput = textInput('restore-name', '', { placeholder: vmName + '-restored', maxlength: 64 });
    const start = el('input', { type: 'checkbox', id: 'restore-start', checked: true });
    const startNote = el('span', { class: 'muted' });
    const summary = el('p', { id: 'restore-summary', class: 'summary' });
    const goButton = el('button', { id: 'restore-go', type: 'button', class: 'btn btn-primary', disabled: !hosts.length || !storages.length }, 'Start restore');

    const chosenKind = () => (document.querySelector('input[name="restore-kind"]:checked') || { value: 'vm' }).value;
    const update = () => {
      const k = chosenKind();
      if (k === 'files') return;
      const instant = k === 'instant';
      // An instant recovery always starts the VM: that is what it is for.
      if (instant) start.checked = true;
      start.disabled = instant;
      startNote.textContent = instant ? ' (an instant recovery always starts it)' : '';
      const name = nameInput.value.trim() || vmName + '-restored';
      summary.textContent = instant
        ? 'Start ' + name + ' on ' + (hostSelect.value || '?') + ' now, running from the repository, while its disks move to '
          + (storageSelect.value || '?') + '.'
        : 'Copy the disks of ' + vmName + (point ? ' (' + fmtTime(point.time) + ')' : '') + ' to ' + (storageSelect.value || '?')
          + ' on ' + (hostSelect.value || '?') + ', then define it as ' + name + (start.checked ? ' and start it.' : ' (not started).');
    };

    const kinds = el('fieldset', { class: 'step' }, el('legend', null, '1. What'),
      kind('vm', 'Whole VM', 'copy its disks to the storage, then define and start it'),
      kind('instant', 'Instant recovery', 'start it now from the repository while its disks move'),
      kind('files', 'Files', 'browse the point\'s volumes and download single files'));
    kinds.addEventListener('change', (e) => {
      if (e.target.name !== 'restore-kind') return;
      if (e.target.value === 'files') {
        go('#/files/' + id);
        return;
      }
      update();
    });
    const where = el('fieldset', { class: 'step' }, el('legend', null, '2. Where'),
      field('Host', hostSelect, 'The host the VM is recovered onto.'),
      field('Storage folder', storageSelect, 'The host\'s folder its disks go to.'),
      field('New VM name', nameInput, 'Empty: ' + vmName + '-restored. A VM of that name must not exist.'),
      el('div', { class: 'field field-check' }, el('label', { class: 'check' }, start, ' Start it once defined'), startNote));
    for (const input of [hostSelect, storageSelect, nameInput, start]) {
      input.addEventListener('input', update);
      input.addEventListener('change', update);
    }
    const check = el('fieldset', { class: 'step' }, el('legend', null, '3. Check and start'), summary, el('div', { class: 'form-actions' }, goButton));

    goButton.addEventListener('click', async () => {
      const k = chosenKind();
      const body = {
        point: id,
        // A copy keeps its point's ID: say which repository's point this page shows.
        repository: point ? point.repository : null,
        kind: k === 'instant' ? 'instant' : 'vm',
        host: hostSelect.value,
        storage: storageSelect.value,
        name: nameInput.value.trim() || null,
        start: k === 'instant' ? true : start.checked,
      };
      goButton.disabled = true;
      try {
        const task = await api('POST', '/api/restores', body);
        if (ctx.alive) go('#/tasks/' + task.id);
      } catch (e) {
        goButton.disabled = false;
        fail(ctx, e);
      }
    });

    body.replaceChildren(pointFacts(point, id), el('div', { class: 'wizard' }, kinds, where, check));
    update();
  }

  // ---------------------------------------------------------------- files

  // Volumes by point: opening a folder re-renders the page, the volumes need not be re-read.
  const volumeCache = new Map();

  function filesHash(id, volume, path) {
    return '#/files/' + id + '?' + new URLSearchParams({ volume, path }).toString();
  }

  function joinPath(dir, name) {
    return (dir.endsWith('/') ? dir : dir + '/') + name;
  }

  async function pageFiles(ctx, view, id, query) {
    const section = pageSection('page-files', 'Files');
    const head = el('div', null);
    const volumeList = el('div', { id: 'volume-list', class: 'volume-list' }, loading());
    const listing = el('div', { class: 'listing' });
    section.append(head, el('div', { class: 'files-layout' },
      el('div', { class: 'panel' }, el('h2', { class: 'panel-title' }, 'Volumes'), volumeList),
      el('div', { class: 'panel' }, listing)));
    view.append(section);

    // The point's facts are a courtesy: the listing does not wait for them.
    orNull(findPoint(id)).then((point) => {
      if (!ctx.alive) return;
      if (point) {
        section.querySelector('h1').textContent = 'Files of ' + point.name;
        setTitle('Files of ' + point.name);
      }
      head.replaceChildren(pointFacts(point, id));
    }).catch(() => {});

    let volumes = volumeCache.get(id);
    if (!volumes) {
      volumes = await api('GET', '/api/points/' + id + '/volumes');
      volumeCache.set(id, volumes);
    }
    if (!ctx.alive) return;
    const chosen = query.get('volume') || (volumes.length === 1 ? volumes[0].name : null);
    const path = query.get('path') || '/';
    volumeList.replaceChildren(...(volumes.length ? volumes.map((v) => el('button', {
      type: 'button', class: 'volume' + (v.name === chosen ? ' active' : ''), dataset: { volume: v.name },
      onclick: () => go(filesHash(id, v.name, '/')),
    }, el('span', { class: 'volume-name' }, v.name),
    el('span', { class: 'muted small' }, [v.filesystem || 'no known file system', fmtBytes(v.size)].join(' · '))))
      : [el('p', { class: 'muted' }, 'This point has no volume whose files can be read.')]));

    if (!chosen) {
      listing.replaceChildren(el('p', { class: 'muted' }, 'Choose a volume.'));
      return;
    }
    listing.replaceChildren(loading());
    const dir = await api('GET', '/api/points/' + id + '/files?volume=' + enc(chosen) + '&path=' + enc(path));
    if (!ctx.alive) return;
    const here = dir.path || path;

    // Breadcrumbs: the volume, then each folder down to this one.
    const crumbs = [el('a', { href: filesHash(id, chosen, '/') }, dir.volume || chosen)];
    let sofar = '';
    for (const part of here.split('/').filter(Boolean)) {
      sofar += '/' + part;
      crumbs.push(el('span', { class: 'crumb-sep' }, '/'), el('a', { href: filesHash(id, chosen, sofar) }, part));
    }
    const entries = (dir.entries || []).slice().sort((a, b) =>
      (a.kind === 'dir' ? 0 : 1) - (b.kind === 'dir' ? 0 : 1) || a.name.localeCompare(b.name));
    const rows = entries.map((f) => {
      const full = joinPath(here, f.name);
      let nameCell;
      if (f.kind === 'dir') nameCell = el('a', { href: filesHash(id, chosen, full), class: 'dir' }, f.name + '/');
      else nameCell = el('span', { class: f.kind === 'symlink' ? 'symlink' : null }, f.name);
      let action = null;
      if (f.kind === 'file') {
        action = el('button', { type: 'button', class: 'btn btn-small download-file' }, 'Download');
        action.addEventListener('click', () => download(ctx, id, chosen, full, f.name, action));
      }
      return el('tr', { dataset: { file: f.name } },
        el('td', null, nameCell),
        el('td', null, f.kind),
        el('td', { class: 'num' }, f.kind === 'file' ? fmtBytes(f.size) : ''),
        el('td', null, f.modified ? fmtTime(f.modified * 1000) : '—'),
        el('td', { class: 'actions' }, action));
    });
    listing.replaceChildren(
      el('div', { id: 'files-path', class: 'crumbs' }, crumbs),
      table('file-table', ['Name', 'Kind', 'Size', 'Modified', ''], rows, 'This folder is empty.'));
  }

  /** Downloads a file of a point: fetched with the token, handed to the browser as a blob. */
  async function download(ctx, id, volume, path, name, button) {
    button.disabled = true;
    button.textContent = 'Downloading…';
    try {
      const blob = await api('GET', '/api/points/' + id + '/download?volume=' + enc(volume) + '&path=' + enc(path), undefined, { blob: true });
      const url = URL.createObjectURL(blob);
      const a = el('a', { href: url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      // Not tied to the page: the browser may still be saving it when the page changes.
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      fail(ctx, e);
    } finally {
      button.disabled = false;
      button.textContent = 'Download';
    }
  }

  // ---------------------------------------------------------------- tokens

  const ROLES = [
    ['viewer', 'viewer: reads only'],
    ['backup', 'backup: runs jobs and reads; never changes a job'],
    ['operator', 'operator: jobs (create, change, delete, run) and reads'],
    ['admin', 'admin: everything, tokens included'],
  ];

  async function pageTokens(ctx, view) {
    const section = pageSection('page-tokens', 'API tokens');
    const listBox = el('div', null, loading());
    const secretBox = el('div', { class: 'secret-box', hidden: true });
    const nameInput = textInput('token-name', '', { placeholder: 'backup-script', maxlength: 64 });
    const roleSelect = select('token-role', ROLES, 'viewer');
    const create = el('button', { id: 'token-create', type: 'submit', class: 'btn btn-primary' }, 'Create token');
    const form = el('form', { id: 'token-form', class: 'inline-form token-form', noValidate: true, autocomplete: 'off' },
      field('Name', nameInput, 'Letters, digits, - _ . @'), field('Role', roleSelect), el('div', { class: 'field' }, create));
    section.append(panel('New token', form, secretBox), panel('Tokens', listBox));
    view.append(section);

    const load = async () => {
      const tokens = await api('GET', '/api/tokens');
      if (!ctx.alive) return;
      tokens.sort((a, b) => a.name.localeCompare(b.name));
      const rows = tokens.map((t) => {
        const revoke = el('button', { type: 'button', class: 'btn btn-small btn-danger revoke-token' }, 'Revoke');
        revoke.addEventListener('click', async () => {
          if (!confirm('Revoke token "' + t.name + '"? Whatever uses it is refused from now on.')) return;
          revoke.disabled = true;
          try {
            await api('DELETE', '/api/tokens/' + enc(t.name));
            if (ctx.alive) await load();
          } catch (e) {
            revoke.disabled = false;
            fail(ctx, e);
          }
        });
        return el('tr', { dataset: { token: t.name } },
          el('td', { class: 'strong' }, t.name),
          el('td', null, el('span', { class: 'tag' }, t.role)),
          el('td', null, el('code', { class: 'small' }, t.id)),
          el('td', null, timeSpan(t.created)),
          el('td', null, timeSpan(t.last_used, 'never')),
          el('td', { class: 'actions' }, revoke));
      });
      listBox.replaceChildren(table('token-table', ['Name', 'Role', 'ID', 'Created', 'Last used', ''], rows, 'No tokens.'));
    };

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      create.disabled = true;
      try {
        const made = await api('POST', '/api/tokens', { name: nameInput.value.trim(), role: roleSelect.value });
        if (!ctx.alive) return;
        // The secret is shown this once: the server keeps only its hash.
        const code = el('code', { id: 'token-secret', class: 'secret' }, made.token);
        const copy = el('button', { type: 'button', class: 'btn btn-small' }, 'Copy');
        copy.addEventListener('click', async () => {
          try {
            await navigator.clipboard.writeText(made.token);
            copy.textContent = 'Copied';
          } catch (err) {
            // No clipboard (plain HTTP, say): select it for a manual copy.
            const range = document.createRange();
            range.selectNodeContents(code);
            const sel = window.getSelection();
            sel.removeAllRanges();
            sel.addRange(range);
            copy.textContent = 'Selected: press Ctrl+C';
          }
        });
        secretBox.replaceChildren(
          el('p', null, 'Token ', el('strong', null, made.name), ' (', made.role, ') was created. Copy its secret now: it is not shown again.'),
          el('div', { class: 'secret-line' }, code, copy));
        secretBox.hidden = false;
        nameInput.value = '';
        await load();
      } catch (err) {
        fail(ctx, err);
      } finally {
        create.disabled = false;
      }
    });

    try {
      await load();
    } catch (e) {
      if (e instanceof SignedOut) return;
      listBox.replaceChildren(el('p', { class: 'muted' }, 'The token list could not be read.'));
      throw e;
    }
  }

  // ---------------------------------------------------------------- not found

  function pageNotFound(view) {
    setTitle('Not found');
    view.append(el('section', { id: 'page-not-found', class: 'page' },
      el('header', { class: 'page-head' }, el('h1', null, 'Page not found')),
      el('p', null, 'Nothing is at ', el('code', null, location.hash), '. ', el('a', { href: '#/' }, 'Back to the dashboard'), '.')));
  }

  // ---------------------------------------------------------------- start

  function start() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', (e) => {
      e.preventDefault();
      signOut('');
    });
    $('message-close').addEventListener('click', clearMessage);
    $('overlay').addEventListener('click', closeOverlay);
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !$('overlay').hidden) closeOverlay();
    });
    window.addEventListener('hashchange', route);
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

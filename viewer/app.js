/*
 * maskvl viewer, app: render (one pass over the active views), the status
 * line, opening a file (picker, drop, or the data embedded by `maskvl view`),
 * start-up and the test hook window.maskvlViewer. Loaded last.
 */
(function (mv) {
  'use strict';

  const { $, UserError, LUT_IMAGE, LUT_TEXT, LUT_DIV } = mv.util;
  const app = mv.app;

  // Render requests. A lazily read file may need row groups that are not in
  // memory yet: render then shows the new state in the status line, asks for
  // them, and draws when they arrive, unless a newer request came first. The
  // previous drawing stays until then.
  let requestId = 0;     // the latest request
  let pending = null;    // { t0 } while the latest request waits for data (t0: when the wait began)
  let drawnWaiters = []; // resolve functions of whenDrawn()
  let lastDrawn = null;  // the dataset drawn last

  /** The (step, layer) pairs the active views show. */
  function neededPairs() {
    const pairs = [mv.grid.viewParams('a')];
    if (app.views.b) pairs.push(mv.grid.viewParams('b'));
    return pairs;
  }

  function render() {
    if (!app.ds) return;
    const ds = app.ds;
    if (!mv.data.hasMetric(ds, app.state.metric)) app.state.metric = 'l2_distance';
    const metric = app.state.metric;
    const pairs = neededPairs();
    const id = ++requestId;
    if (mv.data.isReady(ds, pairs, metric)) {
      draw(metric);
      const t0 = pending ? pending.t0 : null;
      pending = null;
      settle(t0);
      return;
    }
    if (!pending) pending = { t0: performance.now() };
    updateStatus(-1, pairs);
    mv.controls.syncControls();
    mv.data.ensure(ds, pairs, metric).then(() => {
      if (id === requestId && app.ds === ds) render();
    }, (e) => {
      if (app.ds !== ds) return;
      mv.controls.showError(e instanceof UserError ? e.message : 'Could not read the file: ' + (e && e.message));
      if (id !== requestId) return; // a newer request is under way
      pending = null;
      settle(null);
    });
  }

  /** After a draw that shows the latest request: timings, waiters, background reading. */
  function settle(t0) {
    if (t0 !== null) app.perf.lastViewMs = performance.now() - t0;
    const w = drawnWaiters;
    drawnWaiters = [];
    for (const f of w) f();
    const ds = app.ds;
    if (ds.mode === 'lazy' && !ds.allLoaded && config.prefetch) {
      // read ahead while the user looks; a newer request stops this run and starts its own
      const { s, l } = mv.grid.viewParams('a');
      const id = requestId;
      const current = () => app.ds === ds && requestId === id;
      app.perf.backgroundDone = false;
      mv.data.prefetch(ds, s, l, app.state.metric, current).then((done) => {
        if (done && current()) app.perf.backgroundDone = true;
      }, (e) => mv.controls.showError(e.message));
    }
  }

  /** Resolves once the current state is drawn (at once when nothing is waiting for data). */
  function whenDrawn() {
    return pending ? new Promise((resolve) => drawnWaiters.push(resolve)) : Promise.resolve();
  }

  /** Draw the active views, scales, status, chart and heads for the current state. */
  function draw(metric) {
    const t0 = performance.now();
    lastDrawn = app.ds;
    const info = mv.grid.currentMetricInfo();
    const active = [app.views.a];
    if (app.views.b) active.push(app.views.b);
    const pr = app.ds.prompts[app.state.prompt];
    let rowsA = 0;
    for (const v of active) {
      const { s, l } = mv.grid.viewParams(v.which);
      v.seqLen = pr.stepLen[s];
      const rows = mv.grid.gather(v, s, l, app.state.variant, metric);
      if (v.which === 'a') rowsA = rows;
      v.title.textContent = active.length > 1 ? mv.grid.viewTitle(v.which) : '';
    }
    const signed = info.signed;
    const scImg = mv.grid.makeScale(active.map((v) => v.imageVals), mv.grid.excludedCells(), signed, app.state.scaling);
    const scTxt = mv.grid.makeScale(active.map((v) => v.textVals), null, signed, app.state.scaling);
    const lutI = signed ? LUT_DIV : LUT_IMAGE;
    const lutT = signed ? LUT_DIV : LUT_TEXT;
    for (const v of active) {
      for (const b of v.blocks) mv.grid.drawImageBlock(v, b, scImg, lutI);
      mv.grid.drawChips(v, scTxt, lutT);
      // per-view stats use that view's own values
      const own = mv.grid.makeScale([v.imageVals], mv.grid.excludedCells(), signed, 'linear');
      const ownT = mv.grid.makeScale([v.textVals], null, signed, 'linear');
      if (app.layout.images.length) v.imageStats.textContent = mv.grid.statsLine('image', { ...own, lo: scImg.lo, max: scImg.max }, v);
      v.textStats.textContent = mv.grid.statsLine('text', ownT, v);
    }
    mv.grid.drawColourbar($('cbar-image'), $('cbar-image-labels'), scImg, lutI);
    mv.grid.drawColourbar($('cbar-text'), $('cbar-text-labels'), scTxt, lutT);
    $('cbar-image').parentElement.hidden = !app.layout.images.length;
    const notes = [app.layout.images.length ? mv.grid.scaleNote('image', scImg) : '', mv.grid.scaleNote('text', scTxt)];
    const note = notes.filter(Boolean).join('\n');
    if ($('scale-note').textContent !== note) $('scale-note').textContent = note;
    $('scale-note').hidden = !note;
    updateStatus(rowsA);
    mv.controls.syncControls();
    if (app.state.pinned >= 0) mv.chart.drawPinChart(metric); else $('pin-panel').hidden = true;
    if (app.state.heads) mv.grid.drawHeads(metric); else $('heads-panel').hidden = true;
    mv.urlstate.writeHash();
    app.perf.lastRenderMs = performance.now() - t0;
    app.perf.renders++;
  }

  function statusText() {
    const pr = app.ds.prompts[app.state.prompt];
    const gen = pr.generated[app.state.step];
    const lines = [
      `Layer ${app.ds.layers[app.state.layer]} (${app.state.layer + 1} of ${app.ds.L}) · step ${app.ds.steps[app.state.step]} (${app.state.step + 1} of ${app.ds.S})` +
        (gen !== null && gen !== undefined ? ` → generates ${JSON.stringify(gen)}` : ''),
      `metric ${mv.grid.currentMetricInfo().label} · variant ${app.ds.variants[app.state.variant]} (${app.state.variant + 1} of ${app.ds.V}) · scaling ${app.state.scaling}`,
      // files of several prompts (the prototype's) name each one; a maskvl file has one prompt
      `${pr.name !== null ? `prompt ${pr.name}` : 'prompt'}: ` +
        (pr.text !== null ? JSON.stringify(pr.text.length > 300 ? pr.text.slice(0, 300) + '…' : pr.text) : '(text not stored)'),
    ];
    return lines.join('\n');
  }

  /** Why a (step, layer, variant) has no rows: a head the layer does not have (Qwen3.5's linear-attention
   * layers have more heads than its attention layers; metadata `layer_heads`), or just absent. */
  function noRowsReason() {
    const meta = app.ds.meta;
    const name = app.ds.variants[app.state.variant];
    const layer = app.ds.layers[app.state.layer];
    const m = /^Head_(\d+)$/.exec(name || '');
    const heads = meta && Array.isArray(meta.layer_heads) ? meta.layer_heads[layer] : undefined;
    if (m && Number.isInteger(heads) && Number(m[1]) >= heads) {
      const kind = Array.isArray(meta.layer_types) && typeof meta.layer_types[layer] === 'string' ? `${meta.layer_types[layer]} ` : '';
      return `${name} is not at layer ${layer}: this ${kind}layer has ${heads} heads (Head_0 … Head_${heads - 1}).`;
    }
    return 'No rows for this combination in the file.';
  }

  /** The status line; rows: the row count drawn (0: say none), or -1 while `loading` pairs are read. */
  function updateStatus(rows, loading) {
    let s = statusText();
    if (rows === 0) s += '\n' + noRowsReason();
    if (rows === -1) {
      const what = loading.map(({ s: st, l }) => `layer ${app.ds.layers[l]} of step ${app.ds.steps[st]}`).join(' and ');
      s += `\nReading ${what} from the file…`;
    }
    $('status').textContent = s;
  }

  /** Open a file picked or dropped by the user (read in slices when large). */
  async function loadFile(file) {
    return loadSource(mv.data.fileSource(file), file.name, performance.now());
  }

  /** Open a parquet file held in an ArrayBuffer; returns true on success. */
  async function loadBuffer(buf, name, t0) {
    return loadSource(mv.data.bufferSource(buf), name, t0 === undefined ? performance.now() : t0);
  }

  // How files are read (tests may change these): files of at least lazyMinRows rows
  // are read on demand, keeping at most cacheBytes of decoded row groups (beyond those
  // on screen) and reading ahead while idle when prefetch is on; smaller ones are read
  // whole.
  const config = { lazyMinRows: 4000000, cacheBytes: 320 * 2 ** 20, prefetch: true };

  let firstLoad = true;
  let openId = 0;
  // The WebAssembly zstd decoder loads at start-up (a few ms); files wait for it, or
  // for its failure (then the pure-JS decoder reads them).
  let zstdReady = Promise.resolve(false);
  async function loadSource(src, name, t0) {
    const id = ++openId;
    mv.controls.clearError();
    let next;
    try {
      await zstdReady;
      next = await mv.data.openDataset(src, name, config);
    } catch (e) {
      if (id !== openId) return false;
      return failed(name, e);
    }
    if (id !== openId) return false; // another file was opened meanwhile
    const tOpen = performance.now();
    app.ds = next;
    app.imagesLoaded.length = 0;
    app.perf.backgroundDone = false;
    pending = null;
    Object.assign(app.state, { prompt: 0, step: 0, layer: 0, variant: 0, metric: 'l2_distance', scaling: 'linear', excludeFirst: true, compare: 'off', compareWith: 0, heads: false, pinned: -1, override: null });
    $('grid-override').value = '';
    $('file-name').textContent = name;
    $('app').hidden = false;
    $('drop-hint').hidden = true;
    mv.controls.setupControls();
    mv.urlstate.setWriting(false);
    // The URL hash describes the view of the first file opened in this page
    // (a shared link); a file opened later starts fresh.
    mv.urlstate.applyHash(firstLoad ? location.hash : '');
    firstLoad = false;
    render();
    await whenDrawn();
    if (app.ds !== next) return false;
    if (lastDrawn !== next) return failed(name, new UserError('its first view could not be read.'));
    mv.urlstate.setWriting(true);
    mv.urlstate.writeHash();
    const now = performance.now();
    app.perf.load = {
      ok: true, mode: next.mode, t0, totalMs: now - t0, parseMs: next.timings.parse, readMs: next.timings.read,
      indexMs: next.timings.index, renderMs: now - tOpen, rows: next.n,
    };
    const how = next.mode === 'lazy' ? ' · layers read on demand' : '';
    $('load-info').textContent = `${next.n.toLocaleString('en-US')} rows · ${next.L} layers · ${next.S} steps · ${next.V} variants · opened in ${Math.round(app.perf.load.totalMs)} ms${how}`;
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    if (next.mode !== 'lazy') {
      // after the first paint: the other metric columns, then cosmetic extras
      mv.data.loadInBackground(next, () => app.ds === next, () => {
        app.perf.backgroundDone = true;
        if (app.perf.load) app.perf.load.allColumnsMs = performance.now() - app.perf.load.t0;
      }, mv.controls.showError);
      mv.data.loadPromptTexts(next).then(() => { if (app.ds === next) updateStatus(1); });
    }
    return true;
  }

  /** Report a file that cannot be opened; returns false. */
  function failed(name, e) {
    const msg = e instanceof UserError ? e.message : 'Unexpected error while reading the file: ' + (e && e.message);
    mv.controls.showError(`Cannot open ${name}: ${msg}`);
    if (!(e instanceof UserError)) console.error(e);
    app.perf.load = { ok: false, error: msg };
    return false;
  }

  function decodeBase64(s) {
    if (typeof Uint8Array.fromBase64 === 'function') return Uint8Array.fromBase64(s.replace(/\s+/g, ''));
    const bin = atob(s.replace(/\s+/g, ''));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  /** Self-contained pages (maskvl view) embed the parquet bytes and images. */
  async function loadEmbedded() {
    const node = document.getElementById('maskvl-data');
    if (!node) return;
    const t0 = performance.now();
    let bytes;
    try {
      bytes = decodeBase64(node.textContent);
    } catch (e) {
      mv.controls.showError('The embedded data of this page is corrupt: ' + e.message);
      return;
    }
    const ok = await loadBuffer(bytes.buffer, node.getAttribute('data-name') || 'embedded.parquet', t0);
    const imgNode = document.getElementById('maskvl-images');
    if (ok && imgNode) {
      let list = [];
      try { list = JSON.parse(imgNode.textContent); } catch (e) { mv.controls.showError('The embedded images of this page are corrupt.'); }
      for (const it of list) {
        if (it && typeof it.data_url === 'string' && /^data:image\//.test(it.data_url)) mv.controls.loadImageUrl(it.data_url, Number.isInteger(it.index) ? it.index : null, it.name);
      }
    }
  }

  function init() {
    mv.controls.bindControls();
    mv.controls.setupDrop();
    document.addEventListener('keydown', mv.controls.onKey);
    $('file-input').addEventListener('change', (e) => { mv.controls.handleFiles(e.target.files); e.target.value = ''; });
    window.addEventListener('hashchange', () => { if (app.ds && !mv.urlstate.isOwnHash(location.hash)) { mv.urlstate.applyHash(location.hash); render(); } });
    window.addEventListener('error', (e) => mv.controls.showError('Unexpected error: ' + (e.message || e.error)));
    window.addEventListener('unhandledrejection', (e) => mv.controls.showError('Unexpected error: ' + (e.reason && e.reason.message ? e.reason.message : e.reason)));
    if (!window.hyparquet || typeof hyparquet.scanFlatColumn !== 'function') {
      mv.controls.showError('The Parquet reader (vendor/hyparquet.js) did not load; keep the viewer folder together.');
      return;
    }
    zstdReady = hyparquet.initZstd();
    loadEmbedded();
  }

  // Test and automation hook (read-only use: state, timings, export).
  window.maskvlViewer = {
    loadBuffer, exportPNG: () => mv.grid.exportPNG(), perf: app.perf, state: app.state, config, whenDrawn,
    zstdDecoder: () => hyparquet.zstdDecoder(),
    get dataset() { return app.ds; },
    get layout() { return app.layout; },
    render, statusText: () => (app.ds ? statusText() : ''),
    /** Values of a view ('a', or 'b' when comparing) as plain arrays (null where a cell has no value). */
    currentValues(which = 'a') {
      const plain = (a) => Array.from(a, (x) => (Number.isFinite(x) ? x : null));
      const v = app.views[which];
      return {
        image: plain(v.imageVals), text: plain(v.textVals), textPositions: app.layout.textPositions.slice(),
        images: app.layout.images.map((im) => ({ rows: im.rows, cols: im.cols, start: im.start, count: im.count, cellBase: im.cellBase,
          index: im.index, spec: im.spec === undefined ? null : im.spec, kind: im.kind || 'image',
          parts: im.parts ? im.parts.map((p) => ({ rows: p.rows, cols: p.cols, start: p.start, stride: p.stride, offset: p.offset,
            rect: p.rect.slice(), grid: p.grid, kind: p.kind })) : null })),
      };
    },
    imagesLoaded: () => app.imagesLoaded.map((x) => !!x),
    /** The pinned token's chart values: { remaining, values [step][layer] (null: not read or absent) }. */
    pinnedSeries() {
      const ds = app.ds, q = app.state.pinned;
      const ser = mv.data.pinSeries(ds, app.state.prompt, app.state.variant, app.state.metric);
      const values = ds.steps.map((_, s) => ds.layers.map((__, l) => {
        const x = ser.vals[(s * ds.L + l) * ser.nPos + q];
        return Number.isFinite(x) ? x : null;
      }));
      return { remaining: ser.remaining, values };
    },
  };

  Object.assign(app, { render, whenDrawn, statusText, updateStatus, loadFile, loadBuffer });

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})(window.maskvl = window.maskvl || {});

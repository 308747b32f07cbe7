/*
 * maskvl viewer, app: render (one pass over the active views), the status
 * line, opening a file (picker, drop, or the data embedded by `maskvl view`),
 * start-up and the test hook window.maskvlViewer. Loaded last.
 */
(function (mv) {
  'use strict';

  const { $, UserError, METRICS, LUT_IMAGE, LUT_TEXT, LUT_DIV } = mv.util;
  const app = mv.app;

  function render() {
    if (!app.ds) return;
    const t0 = performance.now();
    const info = mv.grid.currentMetricInfo();
    let col = mv.data.metricColumn(app.ds, app.state.metric);
    if (!col) { app.state.metric = 'l2_distance'; col = app.ds.columns.l2_distance; }
    const active = [app.views.a];
    if (app.views.b) active.push(app.views.b);
    const pr = app.ds.prompts[app.state.prompt];
    let rowsA = 0;
    for (const v of active) {
      const { s, l } = mv.grid.viewParams(v.which);
      v.seqLen = pr.stepLen[s];
      const rows = mv.grid.gather(v, s, l, app.state.variant, col);
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
    if (app.state.pinned >= 0) mv.chart.drawPinChart(col); else $('pin-panel').hidden = true;
    if (app.state.heads) mv.grid.drawHeads(col); else $('heads-panel').hidden = true;
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

  function updateStatus(rows) {
    let s = statusText();
    if (rows === 0) s += '\nNo rows for this combination in the file.';
    $('status').textContent = s;
  }

  async function loadFile(file) {
    const t0 = performance.now();
    let buf;
    try {
      buf = await file.arrayBuffer();
    } catch (e) {
      mv.controls.showError(`Could not read ${file.name}: ${e.message}`);
      return;
    }
    await loadBuffer(buf, file.name, t0);
  }

  /** Load a parquet file from an ArrayBuffer; returns true on success. */
  let firstLoad = true;
  async function loadBuffer(buf, name, t0) {
    t0 = t0 === undefined ? performance.now() : t0;
    mv.controls.clearError();
    let next;
    try {
      next = mv.data.buildDataset(buf, name);
    } catch (e) {
      const msg = e instanceof UserError ? e.message : 'Unexpected error while reading the file: ' + (e && e.message);
      mv.controls.showError(`Cannot open ${name}: ${msg}`);
      if (!(e instanceof UserError)) console.error(e);
      app.perf.load = { ok: false, error: msg };
      return false;
    }
    app.ds = next;
    app.imagesLoaded.length = 0;
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
    const tr = performance.now();
    render();
    mv.urlstate.setWriting(true);
    mv.urlstate.writeHash();
    const now = performance.now();
    app.perf.load = { ok: true, t0, totalMs: now - t0, parseMs: app.ds.timings.parse, readMs: app.ds.timings.read, indexMs: app.ds.timings.index, renderMs: now - tr, rows: app.ds.n };
    $('load-info').textContent = `${app.ds.n.toLocaleString('en-US')} rows · ${app.ds.L} layers · ${app.ds.S} steps · ${app.ds.V} variants · opened in ${Math.round(app.perf.load.totalMs)} ms`;
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    // after the first paint: the other metric columns, then cosmetic extras
    app.perf.backgroundDone = false;
    mv.data.loadInBackground(next, () => app.ds === next, () => {
      app.perf.backgroundDone = true;
      if (app.perf.load) app.perf.load.allColumnsMs = performance.now() - app.perf.load.t0;
    }, mv.controls.showError);
    mv.data.loadPromptTexts(app.ds).then(() => { if (app.ds === next) updateStatus(1); });
    return true;
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
    loadEmbedded();
  }

  // Test and automation hook (read-only use: state, timings, export).
  window.maskvlViewer = {
    loadBuffer, exportPNG: () => mv.grid.exportPNG(), perf: app.perf, state: app.state,
    get dataset() { return app.ds; },
    get layout() { return app.layout; },
    render, statusText: () => (app.ds ? statusText() : ''),
    /** Values of the main view as plain arrays (null where a cell has no value). */
    currentValues() {
      const plain = (a) => Array.from(a, (x) => (Number.isFinite(x) ? x : null));
      return {
        image: plain(app.views.a.imageVals), text: plain(app.views.a.textVals), textPositions: app.layout.textPositions.slice(),
        images: app.layout.images.map((im) => ({ rows: im.rows, cols: im.cols, start: im.start, count: im.count, cellBase: im.cellBase })),
      };
    },
    imagesLoaded: () => app.imagesLoaded.map((x) => !!x),
  };

  Object.assign(app, { render, statusText, updateStatus, loadFile, loadBuffer });

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})(window.maskvl = window.maskvl || {});

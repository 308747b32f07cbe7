/*
 * maskvl viewer, URL state: the view lives in the URL hash
 * (#layer=3&step=1&variant=Head_2&metric=l2...), so a link reopens it.
 */
(function (mv) {
  'use strict';

  const { $, METRICS } = mv.util;
  const app = mv.app;

  // ----------------------------------------------------------------- hash

  let hashWriteEnabled = false;
  let lastHash = '';
  let hashTimer = 0;

  /** Turn writing the hash on or off (off while a file's first view is set up). */
  function setWriting(on) { hashWriteEnabled = on; }

  /** True for the hash this page wrote last (its own change, not the user's). */
  function isOwnHash(h) { return h === lastHash; }

  function writeHash() {
    if (!hashWriteEnabled) return;
    const parts = [
      ['prompt', String(app.state.prompt)], ['step', String(app.ds.steps[app.state.step])], ['layer', String(app.ds.layers[app.state.layer])],
      ['variant', app.ds.variants[app.state.variant]], ['metric', METRICS[app.state.metric].short], ['scale', app.state.scaling],
    ];
    if (!app.state.excludeFirst) parts.push(['first', '1']);
    if (app.state.pinned >= 0) parts.push(['pin', String(app.state.pinned)]);
    if (app.state.compare !== 'off') parts.push(['cmp', app.state.compare + ':' + String(app.state.compare === 'layer' ? app.ds.layers[app.state.compareWith] : app.ds.steps[app.state.compareWith])]);
    if (app.state.heads) parts.push(['heads', '1']);
    if (app.state.override) parts.push(['grid', app.state.override.join('x')]);
    const h = '#' + parts.map(([k, v]) => k + '=' + encodeURIComponent(v)).join('&');
    if (h === lastHash) return;
    lastHash = h;
    // replaceState costs ~2 ms and Chromium throttles bursts of it, so keep it
    // out of the key-press path: write once the keys settle.
    clearTimeout(hashTimer);
    hashTimer = setTimeout(() => {
      try { history.replaceState(null, '', lastHash); } catch (e) { /* some file:// contexts refuse; the view still works */ }
    }, 120);
  }

  /** Apply a URL hash (#layer=3&step=1&variant=Head_2&metric=l2...) to the state. */
  function applyHash(hash) {
    const q = new URLSearchParams(String(hash || '').replace(/^#/, ''));
    const idx = (arr, v) => arr.findIndex((x) => String(x) === v);
    if (q.has('grid')) {
      const m = /^(\d+)x(\d+)$/.exec(q.get('grid'));
      app.state.override = m ? [Number(m[1]), Number(m[2])] : null;
      $('grid-override').value = m ? `${m[1]}×${m[2]}` : '';
    }
    if (q.has('prompt')) { const p = Number(q.get('prompt')); if (Number.isInteger(p) && p >= 0 && p < app.ds.P) app.state.prompt = p; }
    if (q.has('step')) { const i = idx(app.ds.steps, q.get('step')); if (i >= 0) app.state.step = i; }
    if (q.has('layer')) { const i = idx(app.ds.layers, q.get('layer')); if (i >= 0) app.state.layer = i; }
    if (q.has('variant')) { const i = app.ds.variants.indexOf(q.get('variant')); if (i >= 0) app.state.variant = i; }
    if (q.has('scale') && ['linear', 'sqrt', 'percentile'].includes(q.get('scale'))) app.state.scaling = q.get('scale');
    if (q.has('metric')) {
      const m = Object.keys(METRICS).find((k) => METRICS[k].short === q.get('metric') || k === q.get('metric'));
      if (m) app.state.metric = m;
    }
    app.state.excludeFirst = q.get('first') !== '1';
    app.state.heads = q.get('heads') === '1';
    if (q.has('cmp')) {
      const [mode, val] = q.get('cmp').split(':');
      if (mode === 'layer' || mode === 'step') {
        app.state.compare = mode;
        const i = idx(mode === 'layer' ? app.ds.layers : app.ds.steps, val);
        app.state.compareWith = i >= 0 ? i : 0;
      }
    } else app.state.compare = 'off';
    mv.controls.clampState();
    app.layout = mv.data.buildLayout(app.ds, app.state.prompt, app.state.override);
    $('grid-msg').textContent = app.layout.msg;
    app.state.pinned = -1;
    if (q.has('pin')) { const p = Number(q.get('pin')); if (Number.isInteger(p) && p >= 0 && p < app.layout.posCell.length && app.layout.posCell[p] >= 0) app.state.pinned = p; }
    mv.grid.rebuildViews();
  }

  mv.urlstate = { writeHash, applyHash, setWriting, isOwnHash };
})(window.maskvl = window.maskvl || {});

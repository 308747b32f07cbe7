/*
 * maskvl viewer, shared helpers: DOM and text helpers, metric names, the
 * variant order and the colour maps.
 *
 * The viewer is a set of classic scripts (no ES modules: Chromium blocks
 * module imports from file://), loaded in the order index.html lists them.
 * Each script adds one part to the namespace object `window.maskvl`:
 *   util.js     helpers (this file)
 *   data.js     Parquet reading, the row index, lazy row-group loading, token layout
 *   grid.js     image grids, text chips, colour scales, heads panel, tooltip, PNG export
 *   chart.js    the pinned token's chart across layers
 *   urlstate.js the view in the URL hash
 *   controls.js form controls, keys, file input, drag and drop, overlay images
 *   app.js      state, render, status line, opening files, start-up, test hook
 * Functions of other parts are looked up at call time (maskvl.grid.render...),
 * so the order only matters for what runs while a script loads (nothing but
 * definitions, until app.js starts the viewer).
 *
 * Safety: file-controlled strings (tokens, prompts, metadata) only ever go
 * through textContent / createElement, never through HTML parsing.
 */
(function (mv) {
  'use strict';

  /** An error whose message is meant for the user, shown in the page. */
  class UserError extends Error {}

  const $ = (id) => document.getElementById(id);

  /** createElement with properties, safe children (strings become text nodes). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const k in props) {
        if (k === 'className') node.className = props[k];
        else if (k === 'text') node.textContent = props[k];
        else if (k === 'title') node.title = props[k];
        else node.setAttribute(k, props[k]);
      }
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return '—';
    const a = Math.abs(v);
    if (a === 0) return '0';
    if (a >= 1000 || a < 0.001) return v.toExponential(2);
    return v.toPrecision(3);
  }

  /** Show whitespace visibly so tokens like " " and "\n" can be told apart. */
  function visibleText(s) {
    if (s === null || s === undefined) return '?';
    if (s === '') return '∅';
    return String(s).replace(/ /g, '·').replace(/\n/g, '↵').replace(/\t/g, '→').replace(/\r/g, '␍');
  }

  const IMAGE_NAME_RE = /image_pad|vision_token|<image>|vision_start/i;
  const IMAGE_SPECIAL_RE = /vision_start|vision_end|image_start|image_end/i;
  function isImageName(s) { return IMAGE_NAME_RE.test(s) || /^img_/i.test(s); }

  /** Closest factor pair rows x cols with rows <= cols and rows*cols == n. */
  function factorPair(n) {
    let r = Math.floor(Math.sqrt(n));
    while (r > 1 && n % r !== 0) r--;
    return [Math.max(r, 1), Math.ceil(n / Math.max(r, 1))];
  }

  /**
   * Natural variant order, the same as Python's maskvl.measures.variant_sort_key:
   * Full, Attn, Head_0, Head_1, ..., Head_10, ... (numeric), Logits, then any
   * other name in code-point order. Used for files whose metadata does not
   * list the variants (the prototype's files).
   */
  function variantRank(name) {
    if (name === 'Full') return [0, 0, ''];
    if (name === 'Attn') return [1, 0, ''];
    const m = /^Head_([0-9]+)$/.exec(name);
    if (m) return [2, Number(m[1]), ''];
    if (name === 'Logits') return [3, 0, ''];
    return [4, 0, name];
  }
  /** Compare two strings by code points, as Python compares str. */
  function compareCodePoints(a, b) {
    const x = [...a], y = [...b];
    for (let i = 0; i < Math.min(x.length, y.length); i++) {
      const d = x[i].codePointAt(0) - y[i].codePointAt(0);
      if (d) return d;
    }
    return x.length - y.length;
  }
  function compareVariants(a, b) {
    const x = variantRank(a), y = variantRank(b);
    return x[0] - y[0] || x[1] - y[1] || compareCodePoints(x[2], y[2]);
  }

  /**
   * The order to show a file's variants in: the order of the metadata's
   * `variants` list (the writer's order) when there is one, with any variant
   * it does not list after those in natural order; else the natural order.
   */
  function variantOrder(names, listed) {
    const at = new Map();
    if (Array.isArray(listed)) listed.forEach((v, i) => { if (typeof v === 'string' && !at.has(v)) at.set(v, i); });
    return names.slice().sort((a, b) => {
      const i = at.has(a) ? at.get(a) : Infinity, j = at.has(b) ? at.get(b) : Infinity;
      if (i !== j) return i < j ? -1 : 1;
      return compareVariants(a, b);
    });
  }

  const METRICS = {
    l2_distance: { short: 'l2', label: 'L2 distance', signed: false },
    cosine_distance: { short: 'cosine', label: 'cosine distance', signed: false },
    kl_divergence: { short: 'kl', label: 'KL divergence', signed: false, logitsOnly: true },
    target_prob_delta: { short: 'tpd', label: 'target prob. delta', signed: true, logitsOnly: true },
  };

  // ------------------------------------------------------------ colour maps

  function makeLut(stops) {
    // stops: [[t, r, g, b], ...] -> 256 x RGB Uint8Array + CSS strings
    const rgb = new Uint8Array(256 * 3);
    const css = new Array(256);
    const ink = new Array(256);
    for (let i = 0; i < 256; i++) {
      const t = i / 255;
      let j = 0;
      while (j < stops.length - 2 && t > stops[j + 1][0]) j++;
      const a = stops[j], b = stops[j + 1];
      const u = Math.min(1, Math.max(0, (t - a[0]) / (b[0] - a[0])));
      const c = [1, 2, 3].map((k) => Math.round(a[k] + (b[k] - a[k]) * u));
      rgb.set(c, i * 3);
      css[i] = `rgb(${c[0]},${c[1]},${c[2]})`;
      ink[i] = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 140 ? '#fff' : '#111';
    }
    return { rgb, css, ink };
  }
  // White -> yellow -> red -> dark red for image patches (YlOrRd-like).
  const LUT_IMAGE = makeLut([[0, 255, 255, 255], [0.25, 254, 217, 118], [0.5, 253, 141, 60], [0.75, 227, 26, 28], [1, 110, 0, 20]]);
  // White -> blue -> navy for text tokens, so the two scales are not confused.
  const LUT_TEXT = makeLut([[0, 255, 255, 255], [0.35, 158, 202, 225], [0.7, 49, 130, 189], [1, 8, 48, 107]]);
  // Diverging blue - white - red for signed metrics (target_prob_delta).
  const LUT_DIV = makeLut([[0, 33, 102, 172], [0.25, 146, 197, 222], [0.5, 247, 247, 247], [0.75, 244, 165, 130], [1, 178, 24, 43]]);

  function debounce(fn, ms) { let t = 0; return () => { clearTimeout(t); t = setTimeout(fn, ms); }; }

  // The state every part reads and app.js drives: what is shown (state), the
  // open file (ds), where its positions go (layout), the views' DOM, the
  // overlay images and timings for the tests.
  mv.app = {
    state: {
      prompt: 0, step: 0, layer: 0, variant: 0, metric: 'l2_distance', scaling: 'linear',
      excludeFirst: true, opacity: 0.65, compare: 'off', compareWith: 0, heads: false, pinned: -1, override: null,
    },
    ds: null,
    layout: null,
    views: { a: null, b: null },
    imagesLoaded: [], // image index -> HTMLImageElement (overlay)
    perf: { lastRenderMs: 0, renders: 0, load: null, backgroundDone: false },
  };

  mv.util = {
    UserError, $, el, fmt, visibleText, isImageName, IMAGE_SPECIAL_RE, factorPair, compareVariants, variantOrder,
    METRICS, LUT_IMAGE, LUT_TEXT, LUT_DIV, debounce,
  };
})(window.maskvl = window.maskvl || {});

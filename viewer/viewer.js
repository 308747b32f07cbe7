/*
 * maskvl viewer: a static, offline viewer for maskvl Parquet files (and the
 * prototype's files). Classic script (no ES modules: Chromium blocks module
 * imports from file://). Depends on window.hyparquet (vendor/hyparquet.js).
 *
 * Design:
 *  - Load: read only the needed columns with hyparquet.scanFlatColumn into
 *    typed arrays (categorical columns become small integer ids, INT64 is
 *    converted once), then build ONE index: a counting sort of the row ids by
 *    key (prompt, step, layer, variant) -> offsets[key]..offsets[key+1] in perm.
 *  - Render: a key press touches only the rows of the current key (~1-2k),
 *    draws image grids on canvas (one pixel per cell, scaled up) and updates
 *    reused text-token chips.
 *  - Safety: file-controlled strings (tokens, prompts, metadata) only ever go
 *    through textContent / createElement, never through HTML parsing.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- helpers

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

  /** Natural variant order: Full, Attn, Head_0..Head_N (numeric), others, Logits. */
  function variantRank(name) {
    if (name === 'Full') return [0, 0, name];
    if (name === 'Attn') return [1, 0, name];
    const m = /^Head_(\d+)$/.exec(name);
    if (m) return [2, Number(m[1]), name];
    if (name === 'Logits') return [4, 0, name];
    return [3, 0, name];
  }
  function compareVariants(a, b) {
    const x = variantRank(a), y = variantRank(b);
    return x[0] - y[0] || x[1] - y[1] || (x[2] < y[2] ? -1 : x[2] > y[2] ? 1 : 0);
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

  // ---------------------------------------------------------------- loading

  function checkMagic(buf) {
    if (buf.byteLength < 12) throw new UserError('This file is too small to be a Parquet file.');
    const b = new Uint8Array(buf);
    const magic = (o) => String.fromCharCode(b[o], b[o + 1], b[o + 2], b[o + 3]);
    if (magic(0) !== 'PAR1' || magic(b.length - 4) !== 'PAR1') {
      throw new UserError('This is not a Parquet file (the PAR1 magic bytes are missing at its start or end; it may be truncated or another format).');
    }
  }

  /** Read a categorical column into ids (Uint16Array) plus its distinct values. */
  function readCategorical(buf, md, name, n) {
    const ids = new Uint16Array(n);
    const values = [];
    const index = new Map();
    const intern = (v) => {
      if (typeof v === 'bigint') v = Number(v);
      let id = index.get(v);
      if (id === undefined) {
        id = values.length;
        if (id >= 65535) throw new UserError(`Column ${name} has more than 65535 distinct values; this viewer does not support that.`);
        index.set(v, id);
        values.push(v);
      }
      return id;
    };
    let dictIds = null;
    let hasNull = false;
    hyparquet.scanFlatColumn(buf, md, name, {
      dictionary(d) {
        dictIds = new Uint16Array(d.length);
        for (let i = 0; i < d.length; i++) dictIds[i] = intern(d[i]);
      },
      page(row0, count, defs, maxDef, vals, isDict) {
        if (defs) {
          let k = 0;
          for (let i = 0; i < count; i++) {
            if (defs[i] !== maxDef) { ids[row0 + i] = 65535; hasNull = true; continue; }
            const v = vals[k++];
            ids[row0 + i] = isDict ? dictIds[v] : intern(v);
          }
        } else if (isDict) {
          for (let i = 0; i < count; i++) ids[row0 + i] = dictIds[vals[i]];
        } else {
          let last, lastId = 0;
          for (let i = 0; i < count; i++) {
            const v = vals[i];
            if (i === 0 || v !== last) { last = v; lastId = intern(v); }
            ids[row0 + i] = lastId;
          }
        }
      },
    });
    if (hasNull) throw new UserError(`Column ${name} contains nulls; every row needs a value there.`);
    return { ids, values };
  }

  /** Read a numeric column into `out` (typed array); nulls become `nullValue`. */
  function readNumeric(buf, md, name, out, nullValue, groups) {
    let dict = null;
    hyparquet.scanFlatColumn(buf, md, name, {
      dictionary(d) {
        dict = new Float64Array(d.length);
        for (let i = 0; i < d.length; i++) dict[i] = Number(d[i]);
      },
      page(row0, count, defs, maxDef, vals, isDict) {
        if (!isDict && typeof vals[0] === 'bigint') vals = bigToNumber(vals);
        if (defs) {
          let k = 0;
          for (let i = 0; i < count; i++) {
            if (defs[i] !== maxDef) { out[row0 + i] = nullValue; continue; }
            const v = vals[k++];
            out[row0 + i] = isDict ? dict[v] : v;
          }
        } else if (isDict) {
          for (let i = 0; i < count; i++) out[row0 + i] = dict[vals[i]];
        } else if (ArrayBuffer.isView(vals)) {
          out.set(vals.length === count ? vals : vals.subarray(0, count), row0);
        } else {
          for (let i = 0; i < count; i++) out[row0 + i] = vals[i] === null || vals[i] === undefined ? nullValue : Number(vals[i]);
        }
      },
    }, hyparquet.compressors, groups || null);
    return out;
  }

  function bigToNumber(vals) {
    const out = new Float64Array(vals.length);
    for (let i = 0; i < vals.length; i++) out[i] = Number(vals[i]);
    return out;
  }

  /**
   * Parse a whole parquet file (ArrayBuffer) into the dataset the viewer
   * renders from. Throws UserError with a readable message on bad input.
   */
  function buildDataset(buf, fileName) {
    const t0 = performance.now();
    checkMagic(buf);
    let md;
    try {
      md = hyparquet.parquetMetadata(buf);
    } catch (e) {
      throw new UserError('Could not read the Parquet footer: ' + e.message);
    }
    const n = Number(md.num_rows);
    let meta = null;
    const kv = (md.key_value_metadata || []).find((x) => x.key === 'maskvl');
    if (kv) {
      try {
        meta = JSON.parse(kv.value);
      } catch (e) {
        throw new UserError('The file\'s "maskvl" metadata is not valid JSON: ' + e.message);
      }
      if (!meta || typeof meta !== 'object') throw new UserError('The file\'s "maskvl" metadata is not a JSON object.');
      if (meta.format_version !== 1) {
        throw new UserError(`Unsupported maskvl format_version ${JSON.stringify(meta.format_version)}; this viewer reads version 1.`);
      }
    }
    const colNames = new Set(md.schema.slice(1).map((s) => s.name));
    const metaTokens = meta && Array.isArray(meta.tokens) && meta.tokens.length ? meta.tokens : null;
    const required = ['generation_step', 'layer', 'token_position', 'variant', 'l2_distance', 'cosine_distance'];
    if (!metaTokens) required.push('token_masked');
    const missing = required.filter((c) => !colNames.has(c));
    if (missing.length) {
      throw new UserError(`Missing column(s): ${missing.join(', ')}. This does not look like a maskvl (or prototype mask-impact) file.`);
    }
    if (n === 0) throw new UserError('The file holds no rows.');
    if (n >= 2 ** 31) throw new UserError('The file holds too many rows for this viewer.');

    let tRead = performance.now();
    let step, layer, variant, prompt, tok;
    const pos = new Int32Array(n);
    const l2 = new Float32Array(n);
    try {
      step = readCategorical(buf, md, 'generation_step', n);
      layer = readCategorical(buf, md, 'layer', n);
      variant = readCategorical(buf, md, 'variant', n);
      prompt = colNames.has('prompt_name') ? readCategorical(buf, md, 'prompt_name', n) : null;
      readNumeric(buf, md, 'token_position', pos, -1);
      readNumeric(buf, md, 'l2_distance', l2, NaN);
      tok = metaTokens ? null : readCategorical(buf, md, 'token_masked', n);
    } catch (e) {
      if (e instanceof UserError) throw e;
      throw new UserError('Could not decode the Parquet data: ' + e.message);
    }
    tRead = performance.now() - tRead;

    // ---- dense sorted ids for each key dimension
    let tIndex = performance.now();
    const sortedRemap = (cat, cmp) => {
      const order = cat.values.map((v, i) => i).sort((a, b) => cmp(cat.values[a], cat.values[b]));
      const rank = new Uint16Array(cat.values.length);
      order.forEach((orig, r) => { rank[orig] = r; });
      return { values: order.map((i) => cat.values[i]), rank };
    };
    const num = (a, b) => a - b;
    const stepS = sortedRemap(step, num);
    const layerS = sortedRemap(layer, num);
    for (const v of variant.values) if (typeof v !== 'string') throw new UserError('Column variant must hold strings.');
    const varS = sortedRemap(variant, compareVariants);
    const promptS = prompt ? { values: prompt.values.map(String), rank: prompt.values.map((v, i) => i) } : { values: [meta && typeof meta.prompt === 'string' ? 'prompt' : 'prompt'], rank: [0] };
    const S = stepS.values.length, L = layerS.values.length, V = varS.values.length, P = promptS.values.length;
    const K = P * S * L * V;

    // ---- counting sort of rows by key
    const key = new Int32Array(n);
    const counts = new Int32Array(K + 1);
    const sIds = step.ids, lIds = layer.ids, vIds = variant.ids, pIds = prompt ? prompt.ids : null;
    const sR = stepS.rank, lR = layerS.rank, vR = varS.rank;
    let maxPos = 0;
    for (let r = 0; r < n; r++) {
      const p = pIds ? pIds[r] : 0;
      const k = ((p * S + sR[sIds[r]]) * L + lR[lIds[r]]) * V + vR[vIds[r]];
      key[r] = k;
      counts[k + 1]++;
      const q = pos[r];
      if (q > maxPos) maxPos = q;
      if (q < 0) throw new UserError(`Row ${r} has no token_position.`);
    }
    if (maxPos > 5e6) throw new UserError(`token_position ${maxPos} is implausibly large.`);
    for (let k = 0; k < K; k++) counts[k + 1] += counts[k];
    const offsets = counts; // offsets[k]..offsets[k+1]
    const fill = offsets.slice(0, K);
    const perm = new Int32Array(n);
    for (let r = 0; r < n; r++) perm[fill[key[r]]++] = r;

    // ---- per-prompt token texts
    const prompts = [];
    for (let p = 0; p < P; p++) {
      prompts.push({ name: promptS.values[p], text: null, firstRow: -1, texts: null, maxPos: -1, stepLen: new Int32Array(S) });
    }
    // first row and max position per prompt and step, via the index (one key per (p, s) suffices for texts below)
    if (tok) {
      const textIds = [];
      for (let p = 0; p < P; p++) textIds.push(new Int32Array(maxPos + 1).fill(-1));
      for (let r = 0; r < n; r++) textIds[pIds ? pIds[r] : 0][pos[r]] = tok.ids[r];
      for (let p = 0; p < P; p++) {
        const ids = textIds[p];
        const texts = new Array(maxPos + 1);
        for (let q = 0; q <= maxPos; q++) texts[q] = ids[q] >= 0 ? String(tok.values[ids[q]]) : null;
        prompts[p].texts = texts;
      }
    } else {
      const texts = new Array(maxPos + 1).fill(null);
      for (const t of metaTokens) {
        if (t && Number.isInteger(t.position) && t.position >= 0 && t.position <= maxPos) texts[t.position] = String(t.text);
      }
      prompts[0].texts = texts;
    }
    for (let p = 0; p < P; p++) {
      const pr = prompts[p];
      for (let s = 0; s < S; s++) {
        // sequence length at step s = 1 + max position over all keys of (p, s)
        let mx = -1;
        const kLo = (p * S + s) * L * V, kHi = kLo + L * V;
        for (let j = offsets[kLo]; j < offsets[kHi]; j++) { const q = pos[perm[j]]; if (q > mx) mx = q; }
        pr.stepLen[s] = mx + 1;
        if (mx > pr.maxPos) pr.maxPos = mx;
      }
      pr.firstRow = offsets[p * S * L * V] < offsets[(p + 1) * S * L * V] ? perm[offsets[p * S * L * V]] : -1;
    }
    if (meta && typeof meta.prompt === 'string') prompts[0].text = meta.prompt;

    // generated token per step: from metadata, else inferred (prototype):
    // the token at position len(step s) exists at step s+1 and is the one generated.
    for (const pr of prompts) {
      pr.generated = new Array(S).fill(null);
      for (let s = 0; s < S; s++) {
        const sv = stepS.values[s];
        const g = meta && Array.isArray(meta.generated) ? meta.generated.find((x) => x && x.step === sv) : null;
        if (g && typeof g.text === 'string') pr.generated[s] = g.text;
        else if (!meta && s + 1 < S && pr.stepLen[s + 1] > pr.stepLen[s]) pr.generated[s] = pr.texts[pr.stepLen[s]];
      }
    }
    tIndex = performance.now() - tIndex;

    const optional = ['kl_divergence', 'target_prob_delta'].filter((c) => colNames.has(c));
    // The first view needs only l2_distance; the other metric columns are read
    // after the first render, one row group per task (see loadInBackground),
    // or at once when a key asks for one before that finished.
    const pending = {};
    for (const c of ['cosine_distance'].concat(optional)) pending[c] = { out: new Float32Array(n), next: 0 };
    return {
      fileName, buf, md, meta, n, pos, perm, offsets,
      steps: stepS.values, layers: layerS.values, variants: varS.values, prompts,
      S, L, V, P,
      columns: { l2_distance: l2 },
      optional, pending,
      hasConfigPrompt: colNames.has('config_prompt'),
      timings: { read: tRead, index: tIndex, parse: performance.now() - t0 },
    };
  }

  /** Read the next row group of a pending metric column; true when the column is complete. */
  function readPendingGroup(d, metric) {
    const p = d.pending[metric];
    try {
      readNumeric(d.buf, d.md, metric, p.out, NaN, [p.next]);
    } catch (e) {
      delete d.pending[metric];
      throw new UserError(`Could not decode column ${metric}: ${e.message}`);
    }
    p.next++;
    if (p.next < d.md.row_groups.length) return false;
    d.columns[metric] = p.out;
    delete d.pending[metric];
    return true;
  }

  /** Metric column; finishes reading it now if the background read has not. */
  function metricColumn(d, metric) {
    if (!d.columns[metric]) {
      if (!d.pending[metric]) return null;
      while (!readPendingGroup(d, metric));
    }
    return d.columns[metric];
  }

  /** Read the pending metric columns one row group per task, keeping the page responsive. */
  function loadInBackground(d) {
    const step = () => {
      if (d !== ds) return; // another file was opened
      const name = Object.keys(d.pending)[0];
      if (!name) {
        perf.backgroundDone = true;
        if (perf.load) perf.load.allColumnsMs = performance.now() - perf.load.t0;
        return;
      }
      try { readPendingGroup(d, name); } catch (e) { showError(e.message); return; }
      setTimeout(step, 0);
    };
    perf.backgroundDone = false;
    setTimeout(step, 0);
  }

  /** Prompt text of a prototype file (config_prompt of the prompt's first row). */
  async function loadPromptTexts(ds) {
    if (!ds.hasConfigPrompt) return;
    for (const pr of ds.prompts) {
      if (pr.text !== null || pr.firstRow < 0) continue;
      try {
        const rows = await hyparquet.parquetReadObjects({
          file: ds.buf, metadata: ds.md, columns: ['config_prompt'], rowStart: pr.firstRow, rowEnd: pr.firstRow + 1,
          compressors: hyparquet.compressors,
        });
        if (rows.length && rows[0].config_prompt !== null && rows[0].config_prompt !== undefined) pr.text = String(rows[0].config_prompt);
      } catch (e) {
        // the prompt text is cosmetic: keep going without it
      }
    }
  }

  // ----------------------------------------------------------------- layout

  /**
   * Where each position of a prompt goes: image cell or text chip.
   * Uses metadata images when present, else detects image tokens by name.
   */
  function buildLayout(ds, p, override) {
    const pr = ds.prompts[p];
    const nPos = pr.maxPos + 1;
    const posImg = new Int16Array(nPos).fill(-1);
    const posCell = new Int32Array(nPos).fill(-1);
    const images = [];
    const meta = ds.meta;
    let msg = '';
    if (meta && Array.isArray(meta.images) && meta.images.length) {
      meta.images.forEach((im, i) => {
        const rows = im.grid_rows, cols = im.grid_cols, start = im.token_start, end = im.token_end;
        if (![rows, cols, start, end].every(Number.isInteger) || rows <= 0 || cols <= 0 || end - start !== rows * cols) {
          throw new UserError(`Image ${i} in the metadata is inconsistent (grid ${rows}×${cols}, tokens ${start}..${end}).`);
        }
        images.push({
          index: i, rows, cols, start, count: end - start, positions: null,
          path: typeof im.path === 'string' ? im.path : null,
          resized: Array.isArray(im.resized_size) ? im.resized_size : null,
          original: Array.isArray(im.original_size) ? im.original_size : null,
        });
      });
    } else {
      // prototype: image tokens by name; runs of consecutive grid tokens are images
      let run = null;
      const runs = [];
      for (let q = 0; q < nPos; q++) {
        const t = pr.texts[q];
        const grid = t !== null && isImageName(t) && !IMAGE_SPECIAL_RE.test(t);
        if (grid) {
          if (run && run.end === q) run.end = q + 1;
          else { run = { start: q, end: q + 1 }; runs.push(run); }
        }
      }
      runs.filter((r) => r.end - r.start > 1).forEach((r, i) => {
        const count = r.end - r.start;
        let [rows, cols] = factorPair(count);
        if (override) {
          if (override[0] * override[1] >= count) [rows, cols] = override;
          else msg = `Grid ${override[0]}×${override[1]} has ${override[0] * override[1]} cells but image ${i} has ${count} tokens; kept ${rows}×${cols}.`;
        }
        images.push({ index: i, rows, cols, start: r.start, count, positions: null, path: null, resized: null, original: null });
      });
    }
    if (override && meta && Array.isArray(meta.images) && meta.images.length) {
      msg = 'This file\'s metadata gives the image grids; the override is ignored.';
    }
    let cellBase = 0;
    images.forEach((im, i) => {
      im.cellBase = cellBase;
      for (let k = 0; k < im.count; k++) {
        const q = im.start + k;
        if (q < nPos) { posImg[q] = i; posCell[q] = cellBase + k; }
      }
      cellBase += im.rows * im.cols;
    });
    const textPositions = [];
    for (let q = 0; q < nPos; q++) {
      if (posImg[q] < 0 && pr.texts[q] !== null) { posCell[q] = textPositions.length; textPositions.push(q); }
    }
    return { p, images, posImg, posCell, textPositions, totalCells: cellBase, msg };
  }

  // ------------------------------------------------------------------ state

  const state = {
    prompt: 0, step: 0, layer: 0, variant: 0, metric: 'l2_distance', scaling: 'linear',
    excludeFirst: true, opacity: 0.65, compare: 'off', compareWith: 0, heads: false, pinned: -1, override: null,
  };
  let ds = null;
  let layout = null;
  const imagesLoaded = []; // index -> HTMLImageElement (overlay)
  const views = { a: null, b: null };
  const perf = { lastRenderMs: 0, renders: 0, load: null, backgroundDone: false };

  // ------------------------------------------------------------- view DOM

  function cellSize(im, nImages, compare) {
    const avail = Math.max(320, (document.documentElement.clientWidth - 48) / (compare ? 2 : 1));
    const maxW = Math.min(640, (avail - 16 * (nImages - 1)) / nImages);
    const aspect = im.resized ? (im.resized[1] / im.rows) / (im.resized[0] / im.cols) : 1; // cell h / w
    let w = Math.floor(Math.min(maxW / im.cols, 560 / (im.rows * aspect), 48));
    w = Math.max(w, 3);
    return [w, Math.max(2, Math.round(w * aspect))];
  }

  /** Build the DOM of one view (image canvases + chips), reused across renders. */
  function buildView(container, which) {
    container.replaceChildren();
    const v = { which, container, title: el('div', { className: 'view-title' }), blocks: [], chips: [] };
    container.append(v.title);
    const imgWrap = el('div', { className: 'images' });
    layout.images.forEach((im, i) => {
      const [cw, ch] = cellSize(im, layout.images.length, state.compare !== 'off');
      const dpr = window.devicePixelRatio || 1;
      const canvas = el('canvas', { 'data-image': String(i) });
      canvas.width = Math.round(im.cols * cw * dpr);
      canvas.height = Math.round(im.rows * ch * dpr);
      canvas.style.width = im.cols * cw + 'px';
      canvas.style.height = im.rows * ch + 'px';
      const small = document.createElement('canvas');
      small.width = im.cols; small.height = im.rows;
      const caption = el('div', { className: 'caption', text: `Image ${i} · ${im.rows}×${im.cols} grid (${im.count} tokens)` + (im.path ? ' · ' + im.path.split(/[\\/]/).pop() : '') });
      const block = el('div', { className: 'image-block', 'data-image': String(i) }, caption, canvas);
      imgWrap.append(block);
      const b = { im, canvas, small, smallCtx: small.getContext('2d'), ctx: canvas.getContext('2d'), cw, ch, img: small.getContext('2d').createImageData(im.cols, im.rows) };
      v.blocks.push(b);
      canvas.addEventListener('mousemove', (e) => hoverCell(e, v, b));
      canvas.addEventListener('mouseleave', hideTip);
      canvas.addEventListener('click', (e) => { const q = cellAt(e, b); if (q >= 0) togglePin(q); });
      block.addEventListener('dragover', (e) => { e.preventDefault(); block.classList.add('drop-target'); });
      block.addEventListener('dragleave', () => block.classList.remove('drop-target'));
      block.addEventListener('drop', (e) => {
        e.preventDefault(); e.stopPropagation(); block.classList.remove('drop-target');
        const f = [...(e.dataTransfer.files || [])].find((x) => x.type.startsWith('image/'));
        if (f) loadImageFile(f, i);
        else if (e.dataTransfer.files.length) handleFiles(e.dataTransfer.files);
      });
    });
    v.imageStats = el('div', { className: 'stats' });
    if (layout.images.length) container.append(el('div', { className: 'view-section-title', text: 'Image tokens' }), imgWrap, v.imageStats);
    v.textStats = el('div', { className: 'stats' });
    const chipWrap = el('div', { className: 'chips' });
    const pr = ds.prompts[layout.p];
    layout.textPositions.forEach((q, i) => {
      const t = pr.texts[q];
      const chip = el('span', { className: 'chip', 'data-pos': String(q) }, el('span', { className: 't', text: visibleText(t) }), el('span', { className: 'v', text: '' }));
      if (/^<\|.*\|>$|^<\/?s>$|^<.*>$/.test(t)) chip.classList.add('special');
      chipWrap.append(chip);
      v.chips.push({ node: chip, val: chip.lastChild, q, shown: true, bg: -1, nodata: false, pin: false });
    });
    chipWrap.addEventListener('mouseover', (e) => { const c = e.target.closest('.chip'); if (c) hoverChip(e, v, Number(c.dataset.pos)); });
    chipWrap.addEventListener('mousemove', (e) => { const c = e.target.closest('.chip'); if (c) moveTip(e); });
    chipWrap.addEventListener('mouseleave', hideTip);
    chipWrap.addEventListener('click', (e) => { const c = e.target.closest('.chip'); if (c) togglePin(Number(c.dataset.pos)); });
    container.append(el('div', { className: 'view-section-title', text: 'Text tokens' }), chipWrap, v.textStats);
    v.imageVals = new Float32Array(layout.totalCells);
    v.textVals = new Float32Array(layout.textPositions.length);
    return v;
  }

  function rebuildViews() {
    views.a = buildView($('view-a'), 'a');
    $('view-b').hidden = state.compare === 'off';
    views.b = state.compare === 'off' ? null : buildView($('view-b'), 'b');
  }

  // ---------------------------------------------------------------- render

  function keyOf(p, s, l, v) { return ((p * ds.S + s) * ds.L + l) * ds.V + v; }

  /** Fill a view's value buffers for (step, layer, variant); returns row count. */
  function gather(v, s, l, vi, col) {
    v.imageVals.fill(NaN);
    v.textVals.fill(NaN);
    const k = keyOf(state.prompt, s, l, vi);
    const lo = ds.offsets[k], hi = ds.offsets[k + 1];
    const perm = ds.perm, pos = ds.pos, posImg = layout.posImg, posCell = layout.posCell, nPos = posImg.length;
    for (let j = lo; j < hi; j++) {
      const r = perm[j];
      const q = pos[r];
      if (q >= nPos) continue;
      const c = posCell[q];
      if (c < 0) continue;
      if (posImg[q] >= 0) v.imageVals[c] = col[r];
      else v.textVals[c] = col[r];
    }
    return hi - lo;
  }

  /** Colour scale of one modality over one or more value buffers. */
  function makeScale(buffers, excluded, signed, scaling) {
    let max = 0, sum = 0, count = 0;
    for (const buf of buffers) {
      for (let i = 0; i < buf.length; i++) {
        const x = buf[i];
        if (!Number.isFinite(x)) continue;
        sum += x; count++;
        if (excluded && excluded.has(i)) continue;
        const a = signed ? Math.abs(x) : x;
        if (a > max) max = a;
      }
    }
    let sorted = null;
    if (scaling === 'percentile') {
      const all = [];
      for (const buf of buffers) for (let i = 0; i < buf.length; i++) if (Number.isFinite(buf[i])) all.push(signed ? buf[i] : buf[i]);
      sorted = Float64Array.from(all).sort();
    }
    return { max, mean: count ? sum / count : NaN, count, signed, scaling, sorted };
  }

  /** Map a value to a LUT index 0..255 under a scale. */
  function lutIndex(x, sc) {
    let t;
    if (sc.scaling === 'percentile') {
      const a = sc.sorted;
      let lo = 0, hi = a.length;
      while (lo < hi) { const m = (lo + hi) >> 1; if (a[m] < x) lo = m + 1; else hi = m; }
      t = a.length > 1 ? lo / (a.length - 1) : 1;
      if (sc.signed) t = t; // percentile rank already spans the diverging map
    } else {
      const m = sc.max > 0 ? sc.max : 1;
      let u = x / m;
      if (sc.signed) {
        u = Math.max(-1, Math.min(1, u));
        if (sc.scaling === 'sqrt') u = Math.sign(u) * Math.sqrt(Math.abs(u));
        t = (u + 1) / 2;
      } else {
        u = Math.max(0, Math.min(1, u));
        t = sc.scaling === 'sqrt' ? Math.sqrt(u) : u;
      }
    }
    return Math.max(0, Math.min(255, Math.round(t * 255)));
  }

  function drawImageBlock(v, b, sc, lut) {
    const { im, img, smallCtx, small, ctx, canvas } = b;
    const d = img.data;
    const vals = v.imageVals;
    for (let k = 0; k < im.rows * im.cols; k++) {
      const x = vals[im.cellBase + k];
      const o = k * 4;
      if (Number.isFinite(x)) {
        const li = lutIndex(x, sc) * 3;
        d[o] = lut.rgb[li]; d[o + 1] = lut.rgb[li + 1]; d[o + 2] = lut.rgb[li + 2]; d[o + 3] = 255;
      } else {
        d[o] = 200; d[o + 1] = 200; d[o + 2] = 200; d[o + 3] = 90; // no value (padding cell or missing row)
      }
    }
    smallCtx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const photo = imagesLoaded[im.index];
    if (photo) {
      // The grid covers the resized image exactly, so stretch the image to the grid's extent.
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(photo, 0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = state.opacity;
    }
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
    if (state.pinned >= 0 && layout.posImg[state.pinned] === im.index) {
      const k = layout.posCell[state.pinned] - im.cellBase;
      const sx = canvas.width / im.cols, sy = canvas.height / im.rows;
      ctx.lineWidth = Math.max(2, sx / 8);
      ctx.strokeStyle = '#000';
      ctx.strokeRect((k % im.cols) * sx + 1, Math.floor(k / im.cols) * sy + 1, sx - 2, sy - 2);
      ctx.strokeStyle = '#fff';
      ctx.lineWidth = 1;
      ctx.strokeRect((k % im.cols) * sx + 2.5, Math.floor(k / im.cols) * sy + 2.5, sx - 5, sy - 5);
    }
  }

  function drawChips(v, sc, lut) {
    for (let i = 0; i < v.chips.length; i++) {
      const c = v.chips[i];
      const x = v.textVals[i];
      const present = c.q < v.seqLen;
      if (present !== c.shown) { c.node.hidden = !present; c.shown = present; }
      if (!present) continue;
      if (Number.isFinite(x)) {
        const li = lutIndex(x, sc);
        if (li !== c.bg) {
          c.node.style.backgroundColor = lut.css[li];
          c.node.style.color = lut.ink[li];
          c.bg = li;
        }
        if (c.nodata) { c.node.classList.remove('nodata'); c.nodata = false; }
      } else {
        if (c.bg !== -2) { c.node.style.backgroundColor = ''; c.node.style.color = ''; c.bg = -2; }
        if (!c.nodata) { c.node.classList.add('nodata'); c.nodata = true; }
      }
      const txt = fmt(x);
      if (c.val.textContent !== txt) c.val.textContent = txt;
      const pin = c.q === state.pinned;
      if (pin !== c.pin) { c.node.classList.toggle('pinned', pin); c.pin = pin; }
    }
  }

  function excludedCells() {
    if (!state.excludeFirst || !layout.images.length) return null;
    return new Set(layout.images.map((im) => im.cellBase));
  }

  function currentMetricInfo() { return METRICS[state.metric]; }

  function viewParams(which) {
    if (which === 'a') return { s: state.step, l: state.layer };
    if (state.compare === 'layer') return { s: state.step, l: state.compareWith };
    return { s: state.compareWith, l: state.layer };
  }

  function viewTitle(which) {
    const { s, l } = viewParams(which);
    return `Layer ${ds.layers[l]} · step ${ds.steps[s]}`;
  }

  function statsLine(kind, sc, v) {
    if (kind === 'image') {
      const grids = layout.images.map((im) => `${im.rows}×${im.cols}`).join(' + ');
      let arg = -1, best = -Infinity;
      for (let i = 0; i < v.imageVals.length; i++) { const x = v.imageVals[i]; if (x > best) { best = x; arg = i; } }
      let where = '';
      if (arg >= 0) {
        const im = layout.images.find((m) => arg >= m.cellBase && arg < m.cellBase + m.rows * m.cols);
        const k = arg - im.cellBase;
        where = ` at image ${im.index} r${Math.floor(k / im.cols)} c${k % im.cols}`;
      }
      return `image: max ${fmt(best === -Infinity ? NaN : best)}${where} · mean ${fmt(sc.mean)} · count ${sc.count} · grid ${grids}` +
        (state.excludeFirst ? ' · scale excludes first image token' : '') + ` · scale max ${fmt(sc.max)}`;
    }
    let arg = -1, best = -Infinity;
    for (let i = 0; i < v.textVals.length; i++) { const x = v.textVals[i]; if (x > best) { best = x; arg = i; } }
    const top = arg >= 0 ? ` at ${JSON.stringify(ds.prompts[state.prompt].texts[layout.textPositions[arg]])} (pos ${layout.textPositions[arg]})` : '';
    return `text: max ${fmt(best === -Infinity ? NaN : best)}${top} · mean ${fmt(sc.mean)} · count ${sc.count}`;
  }

  function render() {
    if (!ds) return;
    const t0 = performance.now();
    const info = currentMetricInfo();
    let col = metricColumn(ds, state.metric);
    if (!col) { state.metric = 'l2_distance'; col = ds.columns.l2_distance; }
    const active = [views.a];
    if (views.b) active.push(views.b);
    const pr = ds.prompts[state.prompt];
    let rowsA = 0;
    for (const v of active) {
      const { s, l } = viewParams(v.which);
      v.seqLen = pr.stepLen[s];
      const rows = gather(v, s, l, state.variant, col);
      if (v.which === 'a') rowsA = rows;
      v.title.textContent = active.length > 1 ? viewTitle(v.which) : '';
    }
    const signed = info.signed;
    const scImg = makeScale(active.map((v) => v.imageVals), excludedCells(), signed, state.scaling);
    const scTxt = makeScale(active.map((v) => v.textVals), null, signed, state.scaling);
    const lutI = signed ? LUT_DIV : LUT_IMAGE;
    const lutT = signed ? LUT_DIV : LUT_TEXT;
    for (const v of active) {
      for (const b of v.blocks) drawImageBlock(v, b, scImg, lutI);
      drawChips(v, scTxt, lutT);
      // per-view stats use that view's own values
      const own = makeScale([v.imageVals], excludedCells(), signed, 'linear');
      const ownT = makeScale([v.textVals], null, signed, 'linear');
      if (layout.images.length) v.imageStats.textContent = statsLine('image', { ...own, max: scImg.max }, v);
      v.textStats.textContent = statsLine('text', ownT, v);
    }
    drawColourbar($('cbar-image'), $('cbar-image-labels'), scImg, lutI);
    drawColourbar($('cbar-text'), $('cbar-text-labels'), scTxt, lutT);
    $('cbar-image').parentElement.hidden = !layout.images.length;
    updateStatus(rowsA);
    syncControls();
    if (state.pinned >= 0) drawPinChart(col); else $('pin-panel').hidden = true;
    if (state.heads) drawHeads(col); else $('heads-panel').hidden = true;
    writeHash();
    perf.lastRenderMs = performance.now() - t0;
    perf.renders++;
  }

  function drawColourbar(canvas, labels, sc, lut) {
    const ctx = canvas.getContext('2d');
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data[i * 4] = lut.rgb[i * 3]; img.data[i * 4 + 1] = lut.rgb[i * 3 + 1]; img.data[i * 4 + 2] = lut.rgb[i * 3 + 2]; img.data[i * 4 + 3] = 255;
    }
    for (let y = 0; y < canvas.height; y++) ctx.putImageData(img, 0, y);
    const ticks = [0, 0.25, 0.5, 0.75, 1];
    const text = ticks.map((t) => colourbarLabel(t, sc));
    if (labels.childElementCount !== ticks.length) labels.replaceChildren(...ticks.map(() => el('span')));
    text.forEach((s, i) => { labels.children[i].textContent = s; });
  }

  /** Value at colourbar position t in [0, 1] under a scale (inverse of lutIndex). */
  function colourbarLabel(t, sc) {
    if (sc.scaling === 'percentile') {
      const a = sc.sorted;
      if (!a || !a.length) return '—';
      return `p${Math.round(t * 100)} ${fmt(a[Math.min(a.length - 1, Math.round(t * (a.length - 1)))])}`;
    }
    if (sc.signed) {
      let u = 2 * t - 1;
      if (sc.scaling === 'sqrt') u = Math.sign(u) * u * u;
      return fmt(u * sc.max);
    }
    return fmt((sc.scaling === 'sqrt' ? t * t : t) * sc.max);
  }

  function statusText() {
    const pr = ds.prompts[state.prompt];
    const gen = pr.generated[state.step];
    const lines = [
      `Layer ${ds.layers[state.layer]} (${state.layer + 1} of ${ds.L}) · step ${ds.steps[state.step]} (${state.step + 1} of ${ds.S})` +
        (gen !== null && gen !== undefined ? ` → generates ${JSON.stringify(gen)}` : ''),
      `metric ${currentMetricInfo().label} · variant ${ds.variants[state.variant]} (${state.variant + 1} of ${ds.V}) · scaling ${state.scaling}`,
      `prompt ${pr.name}: ${pr.text !== null ? JSON.stringify(pr.text.length > 300 ? pr.text.slice(0, 300) + '…' : pr.text) : '(text not stored)'}`,
    ];
    return lines.join('\n');
  }

  function updateStatus(rows) {
    let s = statusText();
    if (rows === 0) s += '\nNo rows for this combination in the file.';
    $('status').textContent = s;
  }

  // ------------------------------------------------------------- controls

  function fillSelect(sel, labels) {
    sel.replaceChildren(...labels.map((t, i) => el('option', { value: String(i), text: t })));
  }

  function availableMetrics() {
    const list = ['l2_distance', 'cosine_distance'];
    if (ds.variants[state.variant] === 'Logits') for (const m of ds.optional) list.push(m);
    return list;
  }

  function setupControls() {
    $('prompt-wrap').hidden = ds.P < 2;
    fillSelect($('prompt-select'), ds.prompts.map((p) => p.name));
    fillSelect($('step-select'), ds.steps.map(String));
    fillSelect($('variant-select'), ds.variants);
    const r = $('layer-range');
    r.min = '0'; r.max = String(ds.L - 1);
  }

  let lastMetricList = '';
  /** Set a control's property only when it differs (each write invalidates style). */
  function setProp(id, prop, value) { const n = $(id); if (n[prop] !== value) n[prop] = value; }

  function syncControls() {
    setProp('prompt-select', 'value', String(state.prompt));
    setProp('layer-range', 'value', String(state.layer));
    setProp('layer-label', 'textContent', `${ds.layers[state.layer]} (${state.layer + 1}/${ds.L})`);
    setProp('step-select', 'value', String(state.step));
    setProp('variant-select', 'value', String(state.variant));
    const ms = availableMetrics();
    const sig = ms.join(',');
    if (sig !== lastMetricList) { fillSelectValues($('metric-select'), ms, ms.map((m) => METRICS[m].label)); lastMetricList = sig; }
    setProp('metric-select', 'value', state.metric);
    setProp('scaling-select', 'value', state.scaling);
    setProp('exclude-first', 'checked', state.excludeFirst);
    setProp('compare-select', 'value', state.compare);
    setProp('heads-toggle', 'checked', state.heads);
    const cw = $('compare-with');
    cw.hidden = state.compare === 'off';
    if (state.compare !== 'off') {
      const labels = state.compare === 'layer' ? ds.layers.map((x) => 'layer ' + x) : ds.steps.map((x) => 'step ' + x);
      if (cw.dataset.kind !== state.compare || cw.options.length !== labels.length) { fillSelect(cw, labels); cw.dataset.kind = state.compare; }
      cw.value = String(state.compareWith);
    }
  }

  function fillSelectValues(sel, values, labels) {
    sel.replaceChildren(...values.map((v, i) => el('option', { value: v, text: labels[i] })));
  }

  function clampState() {
    state.prompt = Math.max(0, Math.min(ds.P - 1, state.prompt | 0));
    state.step = Math.max(0, Math.min(ds.S - 1, state.step | 0));
    state.layer = Math.max(0, Math.min(ds.L - 1, state.layer | 0));
    state.variant = Math.max(0, Math.min(ds.V - 1, state.variant | 0));
    if (!availableMetrics().includes(state.metric)) state.metric = 'l2_distance';
    const lim = state.compare === 'layer' ? ds.L : ds.S;
    state.compareWith = Math.max(0, Math.min(lim - 1, state.compareWith | 0));
  }

  function setCompare(mode) {
    state.compare = mode;
    if (mode === 'layer') state.compareWith = Math.min(ds.L - 1, state.layer + 1);
    if (mode === 'step') state.compareWith = Math.min(ds.S - 1, state.step + 1);
    rebuildViews();
  }

  function setPrompt(p) {
    state.prompt = p;
    state.pinned = -1;
    layout = buildLayout(ds, p, state.override);
    $('grid-msg').textContent = layout.msg;
    rebuildViews();
  }

  function bindControls() {
    const blurAfter = (node) => node.addEventListener('change', () => node.blur());
    $('prompt-select').addEventListener('change', (e) => { setPrompt(Number(e.target.value)); render(); });
    $('layer-range').addEventListener('input', (e) => { state.layer = Number(e.target.value); render(); });
    $('step-select').addEventListener('change', (e) => { state.step = Number(e.target.value); render(); });
    $('variant-select').addEventListener('change', (e) => { state.variant = Number(e.target.value); clampState(); render(); });
    $('metric-select').addEventListener('change', (e) => { state.metric = e.target.value; render(); });
    $('scaling-select').addEventListener('change', (e) => { state.scaling = e.target.value; render(); });
    $('exclude-first').addEventListener('change', (e) => { state.excludeFirst = e.target.checked; render(); });
    $('opacity').addEventListener('input', (e) => { setOpacity(Number(e.target.value) / 100); render(); });
    $('compare-select').addEventListener('change', (e) => { setCompare(e.target.value); render(); });
    $('compare-with').addEventListener('change', (e) => { state.compareWith = Number(e.target.value); render(); });
    $('heads-toggle').addEventListener('change', (e) => { state.heads = e.target.checked; render(); });
    $('grid-override').addEventListener('change', (e) => {
      const m = /^\s*(\d+)\s*[x×*,]\s*(\d+)\s*$/i.exec(e.target.value);
      state.override = m ? [Number(m[1]), Number(m[2])] : null;
      if (e.target.value.trim() && !m) { $('grid-msg').textContent = 'Grid override must look like 16×16 or 16x16.'; return; }
      if (state.override && (state.override[0] < 1 || state.override[1] < 1)) state.override = null;
      setPrompt(state.prompt);
      render();
    });
    $('export-png').addEventListener('click', () => {
      const url = exportPNG();
      const a = el('a', { href: url, download: exportName() });
      document.body.append(a); a.click(); a.remove();
    });
    $('image-input').addEventListener('change', (e) => { for (const f of e.target.files) loadImageFile(f, null); e.target.value = ''; });
    for (const id of ['prompt-select', 'step-select', 'variant-select', 'metric-select', 'scaling-select', 'compare-select', 'compare-with']) blurAfter($(id));
    window.addEventListener('resize', debounce(() => { if (ds) { rebuildViews(); render(); } }, 150));
  }

  function setOpacity(x) {
    state.opacity = Math.max(0, Math.min(1, x));
    $('opacity').value = String(Math.round(state.opacity * 100));
    $('opacity-label').textContent = Math.round(state.opacity * 100) + '%';
  }

  function debounce(fn, ms) { let t = 0; return () => { clearTimeout(t); t = setTimeout(fn, ms); }; }

  // ------------------------------------------------------------------ keys

  function isTyping(t) {
    if (!t || !t.tagName) return false;
    if (t.isContentEditable) return true;
    const tag = t.tagName;
    if (tag === 'TEXTAREA' || tag === 'SELECT') return true;
    if (tag === 'INPUT') return !['checkbox', 'button', 'file', 'submit', 'reset', 'radio', 'color'].includes((t.type || '').toLowerCase());
    return false;
  }

  function onKey(e) {
    // Leave browser and OS shortcuts alone: never capture Ctrl/Cmd/Alt combinations.
    if (!ds || e.ctrlKey || e.metaKey || e.altKey || isTyping(e.target)) return;
    const t0 = performance.now();
    let handled = true;
    switch (e.key) {
      case 'ArrowLeft': state.layer = Math.max(0, state.layer - 1); break;
      case 'ArrowRight': state.layer = Math.min(ds.L - 1, state.layer + 1); break;
      case 'ArrowUp': state.step = Math.max(0, state.step - 1); break;
      case 'ArrowDown': state.step = Math.min(ds.S - 1, state.step + 1); break;
      case 'm': case 'M': {
        const ms = availableMetrics();
        state.metric = ms[(ms.indexOf(state.metric) + 1) % ms.length];
        break;
      }
      case 's': case 'S': {
        const sc = ['linear', 'sqrt', 'percentile'];
        state.scaling = sc[(sc.indexOf(state.scaling) + 1) % sc.length];
        break;
      }
      case 'v': case ']': state.variant = (state.variant + 1) % ds.V; clampState(); break;
      case 'V': case '[': state.variant = (state.variant - 1 + ds.V) % ds.V; clampState(); break;
      case 'h': case 'H': state.heads = !state.heads; break;
      case 'p': case 'P':
        if (ds.P < 2) { handled = false; break; }
        setPrompt((state.prompt + 1) % ds.P); break;
      case 'Escape': if (state.pinned < 0) handled = false; state.pinned = -1; break;
      default: handled = false;
    }
    if (!handled) return;
    e.preventDefault(); // arrows must not scroll the page
    render();
    perf.lastKeyMs = performance.now() - t0;
  }

  // --------------------------------------------------------------- tooltip

  function cellAt(e, b) {
    const rect = b.canvas.getBoundingClientRect();
    const c = Math.floor(((e.clientX - rect.left) / rect.width) * b.im.cols);
    const r = Math.floor(((e.clientY - rect.top) / rect.height) * b.im.rows);
    if (c < 0 || r < 0 || c >= b.im.cols || r >= b.im.rows) return -1;
    const k = r * b.im.cols + c;
    if (k >= b.im.count) return -1;
    return b.im.start + k;
  }

  function showTip(e, text) {
    const tip = $('tooltip');
    tip.textContent = text;
    tip.hidden = false;
    moveTip(e);
  }
  function moveTip(e) {
    const tip = $('tooltip');
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + 'px';
    tip.style.top = e.clientY + 14 + 'px';
  }
  function hideTip() { $('tooltip').hidden = true; }

  function hoverCell(e, v, b) {
    const q = cellAt(e, b);
    if (q < 0) { hideTip(); return; }
    const k = q - b.im.start;
    const x = v.imageVals[b.im.cellBase + k];
    showTip(e, `${visibleText(ds.prompts[state.prompt].texts[q])}  pos ${q}\nimage ${b.im.index} · row ${Math.floor(k / b.im.cols)} col ${k % b.im.cols}\n${currentMetricInfo().label}: ${fmt(x)}`);
  }

  function hoverChip(e, v, q) {
    const i = layout.posCell[q];
    showTip(e, `${JSON.stringify(ds.prompts[state.prompt].texts[q])}  pos ${q}\n${currentMetricInfo().label}: ${fmt(v.textVals[i])}`);
  }

  // ------------------------------------------------------------- pin chart

  function togglePin(q) {
    state.pinned = state.pinned === q ? -1 : q;
    render();
  }

  const STEP_COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22'];

  /** Value of position q at (step, layer, variant): scan of that key's rows. */
  function valueAt(col, s, l, vi, q) {
    const k = keyOf(state.prompt, s, l, vi);
    const perm = ds.perm, pos = ds.pos;
    for (let j = ds.offsets[k], hi = ds.offsets[k + 1]; j < hi; j++) { const r = perm[j]; if (pos[r] === q) return col[r]; }
    return NaN;
  }

  function drawPinChart(col) {
    const q = state.pinned;
    const panel = $('pin-panel');
    panel.hidden = false;
    const series = [];
    let max = 0, min = 0;
    for (let s = 0; s < ds.S; s++) {
      const ys = new Float64Array(ds.L);
      for (let l = 0; l < ds.L; l++) {
        const y = valueAt(col, s, l, state.variant, q);
        ys[l] = y;
        if (y > max) max = y;
        if (y < min) min = y;
      }
      series.push(ys);
    }
    const pr = ds.prompts[state.prompt];
    const where = layout.posImg[q] >= 0 ? (() => { const im = layout.images[layout.posImg[q]]; const k = q - im.start; return ` · image ${im.index} row ${Math.floor(k / im.cols)} col ${k % im.cols}`; })() : '';
    $('pin-title').textContent = `Pinned: ${JSON.stringify(pr.texts[q])} at position ${q}${where} · ${currentMetricInfo().label} · ${ds.variants[state.variant]} across layers (one line per step; Esc to unpin)`;
    const cv = $('pin-chart');
    const ctx = cv.getContext('2d');
    const W = cv.width, H = cv.height, m = { l: 56, r: 10, t: 10, b: 26 };
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, H);
    if (max === min) max = min + 1;
    const X = (l) => m.l + (ds.L > 1 ? (l / (ds.L - 1)) * (W - m.l - m.r) : 0);
    const Y = (y) => H - m.b - ((y - min) / (max - min)) * (H - m.t - m.b);
    ctx.strokeStyle = '#999'; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(m.l, m.t); ctx.lineTo(m.l, H - m.b); ctx.lineTo(W - m.r, H - m.b); ctx.stroke();
    ctx.fillStyle = '#333'; ctx.font = '11px sans-serif'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    for (const y of [min, (min + max) / 2, max]) ctx.fillText(fmt(y), m.l - 4, Y(y));
    ctx.textAlign = 'center'; ctx.textBaseline = 'top';
    const every = Math.max(1, Math.ceil(ds.L / 12));
    for (let l = 0; l < ds.L; l += every) ctx.fillText(String(ds.layers[l]), X(l), H - m.b + 4);
    ctx.strokeStyle = '#bbb'; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(X(state.layer), m.t); ctx.lineTo(X(state.layer), H - m.b); ctx.stroke();
    ctx.setLineDash([]);
    series.forEach((ys, s) => {
      ctx.strokeStyle = STEP_COLOURS[s % STEP_COLOURS.length];
      ctx.lineWidth = s === state.step ? 2.5 : 1.5;
      ctx.beginPath();
      let pen = false;
      for (let l = 0; l < ds.L; l++) {
        if (!Number.isFinite(ys[l])) { pen = false; continue; }
        if (pen) ctx.lineTo(X(l), Y(ys[l])); else ctx.moveTo(X(l), Y(ys[l]));
        pen = true;
      }
      ctx.stroke();
    });
    $('pin-legend').textContent = series.map((_, s) => `step ${ds.steps[s]}: ${STEP_COLOURS[s % STEP_COLOURS.length]}`).join(' · ') + ' · click the chart to jump to a layer';
    cv.onclick = (e) => {
      const rect = cv.getBoundingClientRect();
      const x = ((e.clientX - rect.left) / rect.width) * W;
      state.layer = Math.max(0, Math.min(ds.L - 1, Math.round(((x - m.l) / (W - m.l - m.r)) * (ds.L - 1))));
      render();
    };
  }

  // --------------------------------------------------------- heads panel

  function drawHeads(col) {
    const panel = $('heads-panel');
    panel.hidden = false;
    const heads = [];
    ds.variants.forEach((name, i) => { if (/^Head_\d+$/.test(name)) heads.push(i); });
    const grid = $('heads-grid');
    if (!heads.length) {
      $('heads-title').textContent = 'This file has no per-head variants.';
      grid.replaceChildren();
      return;
    }
    const s = state.step, l = state.layer;
    const tmp = { imageVals: new Float32Array(layout.totalCells), textVals: new Float32Array(layout.textPositions.length) };
    const vals = heads.map((vi) => { gather(tmp, s, l, vi, col); return { img: tmp.imageVals.slice(), txt: tmp.textVals.slice() }; });
    const signed = currentMetricInfo().signed;
    const scI = makeScale(vals.map((x) => x.img), excludedCells(), signed, state.scaling === 'percentile' ? 'linear' : state.scaling);
    const scT = makeScale(vals.map((x) => x.txt), null, signed, state.scaling === 'percentile' ? 'linear' : state.scaling);
    $('heads-title').textContent = `All ${heads.length} heads at layer ${ds.layers[l]}, step ${ds.steps[s]} (${currentMetricInfo().label}; shared scales: image max ${fmt(scI.max)}, text max ${fmt(scT.max)}; click a head to select it)`;
    const lutI = signed ? LUT_DIV : LUT_IMAGE, lutT = signed ? LUT_DIV : LUT_TEXT;
    const nT = layout.textPositions.length;
    const wImg = layout.images.reduce((a, im) => a + im.cols, 0) + Math.max(0, layout.images.length - 1);
    const hImg = layout.images.reduce((a, im) => Math.max(a, im.rows), 0);
    const W = Math.max(wImg, Math.min(nT, 48), 8);
    const textRows = Math.ceil(nT / W);
    const H = hImg + (hImg ? 1 : 0) + textRows;
    const scale = Math.max(2, Math.min(6, Math.floor(128 / W)));
    if (grid.childElementCount !== heads.length) {
      grid.replaceChildren(...heads.map((vi) => {
        const c = el('canvas');
        const tile = el('div', { className: 'head-tile', 'data-variant': String(vi) }, c, el('span', { text: ds.variants[vi] }));
        tile.addEventListener('click', () => { state.variant = vi; clampState(); render(); });
        return tile;
      }));
    }
    heads.forEach((vi, h) => {
      const tile = grid.children[h];
      tile.classList.toggle('current', vi === state.variant);
      const c = tile.firstChild;
      if (c.width !== W || c.height !== H) { c.width = W; c.height = H; c.style.width = W * scale + 'px'; c.style.height = H * scale + 'px'; }
      const ctx = c.getContext('2d');
      const img = ctx.createImageData(W, H);
      const d = img.data;
      const put = (x, y, li, lut) => { const o = (y * W + x) * 4; d[o] = lut.rgb[li * 3]; d[o + 1] = lut.rgb[li * 3 + 1]; d[o + 2] = lut.rgb[li * 3 + 2]; d[o + 3] = 255; };
      let x0 = 0;
      for (const im of layout.images) {
        for (let k = 0; k < im.rows * im.cols; k++) {
          const x = vals[h].img[im.cellBase + k];
          if (Number.isFinite(x)) put(x0 + (k % im.cols), Math.floor(k / im.cols), lutIndex(x, scI), lutI);
        }
        x0 += im.cols + 1;
      }
      const y0 = hImg ? hImg + 1 : 0;
      for (let i = 0; i < nT; i++) {
        const x = vals[h].txt[i];
        if (Number.isFinite(x)) put(i % W, y0 + Math.floor(i / W), lutIndex(x, scT), lutT);
      }
      ctx.putImageData(img, 0, 0);
    });
  }

  // ------------------------------------------------------------ export PNG

  function exportName() {
    const base = (ds.fileName || 'maskvl').replace(/\.parquet$/i, '').replace(/[^\w.-]+/g, '_');
    return `${base}_L${ds.layers[state.layer]}_S${ds.steps[state.step]}_${ds.variants[state.variant]}_${METRICS[state.metric].short}.png`;
  }

  /** Render the current view (grids, colourbars, text tokens) into a PNG data URL. */
  function exportPNG() {
    const pad = 16;
    const active = [views.a].concat(views.b ? [views.b] : []);
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(720, ...active.map((v) => v.blocks.reduce((a, b) => a + b.canvas.width / dpr + pad, pad)));
    const chipFont = '12px monospace';
    const meas = document.createElement('canvas').getContext('2d');
    meas.font = chipFont;
    // lay out chips in rows to know the height
    const chipRows = (v) => {
      let x = pad, y = 0;
      const out = [];
      v.chips.forEach((c, i) => {
        if (!c.shown) return;
        const label = visibleText(ds.prompts[state.prompt].texts[c.q]);
        const w = Math.max(meas.measureText(label).width, meas.measureText(fmt(v.textVals[i])).width) + 8;
        if (x + w > W - pad) { x = pad; y += 34; }
        out.push({ x, y, w, label, i });
        x += w + 3;
      });
      return { items: out, height: out.length ? y + 34 : 0 };
    };
    const layouts = active.map(chipRows);
    let H = pad + 60;
    active.forEach((v, i) => {
      const gh = v.blocks.reduce((a, b) => Math.max(a, b.canvas.height / dpr), 0);
      H += (v.blocks.length ? gh + 24 : 0) + layouts[i].height + 30;
    });
    H += 60;
    const c = document.createElement('canvas');
    c.width = W; c.height = H;
    const ctx = c.getContext('2d');
    ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, H);
    ctx.fillStyle = '#111'; ctx.font = '12px monospace'; ctx.textBaseline = 'top';
    statusText().split('\n').forEach((line, i) => ctx.fillText(line.length > 140 ? line.slice(0, 140) + '…' : line, pad, pad + i * 16));
    let y = pad + 60;
    active.forEach((v, vi) => {
      if (active.length > 1) { ctx.fillStyle = '#111'; ctx.font = 'bold 12px sans-serif'; ctx.fillText(viewTitle(v.which), pad, y - 14); }
      let x = pad, gh = 0;
      for (const b of v.blocks) {
        const w = b.canvas.width / dpr, h = b.canvas.height / dpr;
        ctx.drawImage(b.canvas, x, y, w, h);
        ctx.strokeStyle = '#999'; ctx.strokeRect(x - 0.5, y - 0.5, w + 1, h + 1);
        x += w + pad; gh = Math.max(gh, h);
      }
      if (v.blocks.length) y += gh + 24;
      ctx.font = chipFont;
      for (const it of layouts[vi].items) {
        const ch = v.chips[it.i];
        ctx.fillStyle = ch.node.style.backgroundColor || '#eee';
        ctx.fillRect(it.x, y + it.y, it.w, 30);
        ctx.strokeStyle = '#bbb'; ctx.strokeRect(it.x + 0.5, y + it.y + 0.5, it.w - 1, 29);
        ctx.fillStyle = ch.node.style.color || '#111';
        ctx.fillText(it.label, it.x + 4, y + it.y + 2);
        ctx.fillText(fmt(v.textVals[it.i]), it.x + 4, y + it.y + 16);
      }
      y += layouts[vi].height + 30;
    });
    // colourbars with their labels
    let x = pad;
    for (const id of ['image', 'text']) {
      const bar = $('cbar-' + id);
      if (bar.parentElement.hidden) continue;
      ctx.fillStyle = '#333'; ctx.font = '11px sans-serif';
      ctx.fillText(id === 'image' ? 'Image scale' : 'Text scale', x, y);
      ctx.drawImage(bar, x, y + 14, 256, 14);
      ctx.strokeStyle = '#999'; ctx.strokeRect(x - 0.5, y + 13.5, 257, 15);
      const labels = [...$('cbar-' + id + '-labels').children].map((n) => n.textContent);
      labels.forEach((s, i) => { ctx.textAlign = i === 0 ? 'left' : i === labels.length - 1 ? 'right' : 'center'; ctx.fillText(s, x + (i / (labels.length - 1)) * 256, y + 32); });
      ctx.textAlign = 'left';
      x += 256 + 48;
    }
    return c.toDataURL('image/png');
  }

  // ----------------------------------------------------------------- hash

  let hashWriteEnabled = false;
  let firstLoad = true;
  let lastHash = '';
  function writeHash() {
    if (!hashWriteEnabled) return;
    const parts = [
      ['prompt', String(state.prompt)], ['step', String(ds.steps[state.step])], ['layer', String(ds.layers[state.layer])],
      ['variant', ds.variants[state.variant]], ['metric', METRICS[state.metric].short], ['scale', state.scaling],
    ];
    if (!state.excludeFirst) parts.push(['first', '1']);
    if (state.pinned >= 0) parts.push(['pin', String(state.pinned)]);
    if (state.compare !== 'off') parts.push(['cmp', state.compare + ':' + String(state.compare === 'layer' ? ds.layers[state.compareWith] : ds.steps[state.compareWith])]);
    if (state.heads) parts.push(['heads', '1']);
    if (state.override) parts.push(['grid', state.override.join('x')]);
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
  let hashTimer = 0;

  /** Apply a URL hash (#layer=3&step=1&variant=Head_2&metric=l2...) to the state. */
  function applyHash(hash) {
    const q = new URLSearchParams(String(hash || '').replace(/^#/, ''));
    const idx = (arr, v) => arr.findIndex((x) => String(x) === v);
    if (q.has('grid')) {
      const m = /^(\d+)x(\d+)$/.exec(q.get('grid'));
      state.override = m ? [Number(m[1]), Number(m[2])] : null;
      $('grid-override').value = m ? `${m[1]}×${m[2]}` : '';
    }
    if (q.has('prompt')) { const p = Number(q.get('prompt')); if (Number.isInteger(p) && p >= 0 && p < ds.P) state.prompt = p; }
    if (q.has('step')) { const i = idx(ds.steps, q.get('step')); if (i >= 0) state.step = i; }
    if (q.has('layer')) { const i = idx(ds.layers, q.get('layer')); if (i >= 0) state.layer = i; }
    if (q.has('variant')) { const i = ds.variants.indexOf(q.get('variant')); if (i >= 0) state.variant = i; }
    if (q.has('scale') && ['linear', 'sqrt', 'percentile'].includes(q.get('scale'))) state.scaling = q.get('scale');
    if (q.has('metric')) {
      const m = Object.keys(METRICS).find((k) => METRICS[k].short === q.get('metric') || k === q.get('metric'));
      if (m) state.metric = m;
    }
    state.excludeFirst = q.get('first') !== '1';
    state.heads = q.get('heads') === '1';
    if (q.has('cmp')) {
      const [mode, val] = q.get('cmp').split(':');
      if (mode === 'layer' || mode === 'step') {
        state.compare = mode;
        const i = idx(mode === 'layer' ? ds.layers : ds.steps, val);
        state.compareWith = i >= 0 ? i : 0;
      }
    } else state.compare = 'off';
    clampState();
    layout = buildLayout(ds, state.prompt, state.override);
    $('grid-msg').textContent = layout.msg;
    state.pinned = -1;
    if (q.has('pin')) { const p = Number(q.get('pin')); if (Number.isInteger(p) && p >= 0 && p < layout.posCell.length && layout.posCell[p] >= 0) state.pinned = p; }
    rebuildViews();
  }

  // --------------------------------------------------------------- images

  function loadImageFile(file, index) {
    const url = URL.createObjectURL(file);
    loadImageUrl(url, index, file.name);
  }

  /** Attach an overlay image to image slot `index` (null: match by name, else first free slot). */
  function loadImageUrl(url, index, name) {
    const img = new Image();
    img.onload = () => {
      let i = index;
      if (i === null || i === undefined) {
        const ims = layout ? layout.images : [];
        const base = (name || '').split(/[\\/]/).pop();
        const byName = ims.findIndex((im) => im.path && im.path.split(/[\\/]/).pop() === base);
        i = byName >= 0 ? byName : ims.findIndex((im) => !imagesLoaded[im.index]);
        if (i < 0) i = 0;
      }
      imagesLoaded[i] = img;
      if (ds) render();
    };
    img.onerror = () => showError(`Could not load the image ${name || ''} (unsupported or corrupt image file).`);
    img.src = url;
  }

  // ------------------------------------------------------------ file input

  function showError(msg) {
    const box = $('error');
    box.textContent = msg;
    box.hidden = false;
  }
  function clearError() { $('error').hidden = true; $('error').textContent = ''; }

  async function handleFiles(fileList) {
    const files = [...fileList];
    const pq = files.find((f) => /\.parquet$/i.test(f.name)) || files.find((f) => !f.type.startsWith('image/'));
    const imgs = files.filter((f) => f !== pq && f.type.startsWith('image/'));
    if (pq) await loadFile(pq);
    for (const f of imgs) loadImageFile(f, null);
  }

  async function loadFile(file) {
    const t0 = performance.now();
    let buf;
    try {
      buf = await file.arrayBuffer();
    } catch (e) {
      showError(`Could not read ${file.name}: ${e.message}`);
      return;
    }
    await loadBuffer(buf, file.name, t0);
  }

  /** Load a parquet file from an ArrayBuffer; returns true on success. */
  async function loadBuffer(buf, name, t0) {
    t0 = t0 === undefined ? performance.now() : t0;
    clearError();
    let next;
    try {
      next = buildDataset(buf, name);
    } catch (e) {
      const msg = e instanceof UserError ? e.message : 'Unexpected error while reading the file: ' + (e && e.message);
      showError(`Cannot open ${name}: ${msg}`);
      if (!(e instanceof UserError)) console.error(e);
      perf.load = { ok: false, error: msg };
      return false;
    }
    ds = next;
    imagesLoaded.length = 0;
    Object.assign(state, { prompt: 0, step: 0, layer: 0, variant: 0, metric: 'l2_distance', scaling: 'linear', excludeFirst: true, compare: 'off', compareWith: 0, heads: false, pinned: -1, override: null });
    $('grid-override').value = '';
    $('file-name').textContent = name;
    $('app').hidden = false;
    $('drop-hint').hidden = true;
    setupControls();
    hashWriteEnabled = false;
    // The URL hash describes the view of the first file opened in this page
    // (a shared link); a file opened later starts fresh.
    applyHash(firstLoad ? location.hash : '');
    firstLoad = false;
    const tr = performance.now();
    render();
    hashWriteEnabled = true;
    writeHash();
    const now = performance.now();
    perf.load = { ok: true, t0, totalMs: now - t0, parseMs: ds.timings.parse, readMs: ds.timings.read, indexMs: ds.timings.index, renderMs: now - tr, rows: ds.n };
    $('load-info').textContent = `${ds.n.toLocaleString('en-US')} rows · ${ds.L} layers · ${ds.S} steps · ${ds.V} variants · opened in ${Math.round(perf.load.totalMs)} ms`;
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    // after the first paint: the other metric columns, then cosmetic extras
    loadInBackground(ds);
    loadPromptTexts(ds).then(() => { if (ds === next) updateStatus(1); });
    return true;
  }

  function setupDrop() {
    let depth = 0;
    document.addEventListener('dragenter', (e) => { e.preventDefault(); depth++; document.body.classList.add('dragging'); });
    document.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); if (!depth) document.body.classList.remove('dragging'); });
    document.addEventListener('dragover', (e) => e.preventDefault());
    document.addEventListener('drop', (e) => {
      e.preventDefault(); depth = 0; document.body.classList.remove('dragging');
      if (e.dataTransfer && e.dataTransfer.files.length) handleFiles(e.dataTransfer.files);
    });
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
      showError('The embedded data of this page is corrupt: ' + e.message);
      return;
    }
    const ok = await loadBuffer(bytes.buffer, node.getAttribute('data-name') || 'embedded.parquet', t0);
    const imgNode = document.getElementById('maskvl-images');
    if (ok && imgNode) {
      let list = [];
      try { list = JSON.parse(imgNode.textContent); } catch (e) { showError('The embedded images of this page are corrupt.'); }
      for (const it of list) {
        if (it && typeof it.data_url === 'string' && /^data:image\//.test(it.data_url)) loadImageUrl(it.data_url, Number.isInteger(it.index) ? it.index : null, it.name);
      }
    }
  }

  function init() {
    bindControls();
    setupDrop();
    document.addEventListener('keydown', onKey);
    $('file-input').addEventListener('change', (e) => { handleFiles(e.target.files); e.target.value = ''; });
    window.addEventListener('hashchange', () => { if (ds && location.hash !== lastHash) { applyHash(location.hash); render(); } });
    window.addEventListener('error', (e) => showError('Unexpected error: ' + (e.message || e.error)));
    window.addEventListener('unhandledrejection', (e) => showError('Unexpected error: ' + (e.reason && e.reason.message ? e.reason.message : e.reason)));
    if (!window.hyparquet || typeof hyparquet.scanFlatColumn !== 'function') {
      showError('The Parquet reader (vendor/hyparquet.js) did not load; keep the viewer folder together.');
      return;
    }
    loadEmbedded();
  }

  // Test and automation hook (read-only use: state, timings, export).
  window.maskvlViewer = {
    loadBuffer, exportPNG, perf, state,
    get dataset() { return ds; },
    get layout() { return layout; },
    render, statusText: () => (ds ? statusText() : ''),
    /** Values of the main view as plain arrays (null where a cell has no value). */
    currentValues() {
      const plain = (a) => Array.from(a, (x) => (Number.isFinite(x) ? x : null));
      return {
        image: plain(views.a.imageVals), text: plain(views.a.textVals), textPositions: layout.textPositions.slice(),
        images: layout.images.map((im) => ({ rows: im.rows, cols: im.cols, start: im.start, count: im.count, cellBase: im.cellBase })),
      };
    },
    imagesLoaded: () => imagesLoaded.map((x) => !!x),
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

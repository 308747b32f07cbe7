/*
 * maskvl viewer, data: reading a Parquet file into typed arrays and the row
 * index the views draw from, and the layout of token positions (image cell or
 * text chip). Depends on window.hyparquet (vendor/hyparquet.js) and util.js.
 *
 * Load: read only the needed columns with hyparquet.scanFlatColumn into typed
 * arrays (categorical columns become small integer ids, INT64 is converted
 * once), then build ONE index: a counting sort of the row ids by key
 * (prompt, step, layer, variant) -> offsets[key]..offsets[key+1] in perm.
 */
(function (mv) {
  'use strict';

  const { UserError, isImageName, IMAGE_SPECIAL_RE, factorPair, variantOrder } = mv.util;

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
    const varOrder = variantOrder(variant.values, meta ? meta.variants : null);
    const varS = sortedRemap(variant, (a, b) => varOrder.indexOf(a) - varOrder.indexOf(b));
    // Prompt names come from the prototype's prompt_name column; a maskvl file has one, unnamed, prompt.
    const promptS = prompt ? { values: prompt.values.map(String), rank: prompt.values.map((v, i) => i) } : { values: [null], rank: [0] };
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

  /**
   * Read the pending metric columns one row group per task, keeping the page
   * responsive. Stops when isCurrent() turns false (another file was opened);
   * calls onDone() when every column is read, onError(message) on a failure.
   */
  function loadInBackground(d, isCurrent, onDone, onError) {
    const step = () => {
      if (!isCurrent()) return;
      const name = Object.keys(d.pending)[0];
      if (!name) { onDone(); return; }
      try { readPendingGroup(d, name); } catch (e) { onError(e.message); return; }
      setTimeout(step, 0);
    };
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

  mv.data = { buildDataset, metricColumn, loadInBackground, loadPromptTexts, buildLayout };
})(window.maskvl = window.maskvl || {});

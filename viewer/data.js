/*
 * maskvl viewer, data: reading a Parquet file into typed arrays and the row
 * index the views draw from, and the layout of token positions (image cell or
 * text chip). Depends on window.hyparquet (vendor/hyparquet.js) and util.js.
 *
 * Two ways to read a file (openDataset picks one):
 *  - Whole (files under ~4M rows, the prototype's files, files without the
 *    metadata or statistics below): read only the needed columns with
 *    hyparquet.scanFlatColumn into typed arrays (categorical columns become
 *    small integer ids, INT64 is converted once), then build ONE index: a
 *    counting sort of the row ids by key (prompt, step, layer, variant) ->
 *    offsets[key]..offsets[key+1] in perm. Every key is then instant.
 *  - Lazy (large maskvl files): the footer only, then the row groups that hold
 *    the (step, layer) on screen, found by their generation_step / layer
 *    statistics and read from the File by slices, each indexed the same way.
 *    A cache of decoded groups (least recently used out) and reading ahead
 *    while idle keep the arrow keys instant; the token and variant lists come
 *    from the maskvl metadata.
 * Both are used through one interface: hasMetric, isReady, ensure, segments,
 * pinSeries.
 *
 * Group runs (a `groups` list in the metadata and a group_index column; see
 * docs/FORMAT.md): each row is a set of positions removed together, so the
 * "positions" of such a file are its group indices (read from group_index,
 * the texts are the group labels), and the layout maps a group to all of its
 * cells. They are small (one row per group) and always read whole.
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
   * The footer's facts the viewer needs, checked: { md, meta (maskvl metadata
   * or null), n (rows), colNames, metaTokens }. Throws UserError on bad input.
   */
  function checkFooter(md) {
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
      if (meta.format_version !== 1 && meta.format_version !== 2) {
        throw new UserError(`Unsupported maskvl format_version ${JSON.stringify(meta.format_version)}; this viewer reads versions 1 and 2.`);
      }
    }
    const colNames = new Set(md.schema.slice(1).map((s) => s.name));
    const metaTokens = meta && Array.isArray(meta.tokens) && meta.tokens.length ? meta.tokens : null;
    const grouped = !!(meta && Array.isArray(meta.groups) && meta.groups.length && colNames.has('group_index'));
    const required = ['generation_step', 'layer', grouped ? 'group_index' : 'token_position', 'variant', 'l2_distance',
      'cosine_distance'];
    if (!metaTokens) required.push('token_masked');
    const missing = required.filter((c) => !colNames.has(c));
    if (missing.length) {
      throw new UserError(`Missing column(s): ${missing.join(', ')}. This does not look like a maskvl (or prototype mask-impact) file.`);
    }
    if (n === 0) throw new UserError('The file holds no rows.');
    if (n >= 2 ** 31) throw new UserError('The file holds too many rows for this viewer.');
    if (grouped) checkGroups(meta);
    return { md, meta, n, colNames, metaTokens, grouped };
  }

  /** The metadata's group list, checked enough for the layout to trust it. */
  function checkGroups(meta) {
    const nImages = Array.isArray(meta.images) ? meta.images.length : 0;
    meta.groups.forEach((g, i) => {
      const ok = g && typeof g === 'object' && Array.isArray(g.positions) && g.positions.every(Number.isInteger)
        && (g.image_index === null || (Number.isInteger(g.image_index) && g.image_index >= 0 && g.image_index < nImages));
      if (!ok) throw new UserError(`Group ${i} in the metadata is malformed (it needs positions and an image_index).`);
    });
  }

  /** Token texts by position 0..maxPos from the metadata's token list (null where absent). */
  function metaTexts(metaTokens, maxPos) {
    const texts = new Array(maxPos + 1).fill(null);
    for (const t of metaTokens) {
      if (t && Number.isInteger(t.position) && t.position >= 0 && t.position <= maxPos) texts[t.position] = String(t.text);
    }
    return texts;
  }

  /** The metadata's generated token text of each step (null where absent). */
  function metaGenerated(meta, steps) {
    return steps.map((sv) => {
      const g = Array.isArray(meta.generated) ? meta.generated.find((x) => x && x.step === sv) : null;
      return g && typeof g.text === 'string' ? g.text : null;
    });
  }

  /**
   * Parse a whole parquet file (ArrayBuffer) into the dataset the viewer
   * renders from; `footer` (from checkFooter) when the caller has read it.
   * Throws UserError with a readable message on bad input.
   */
  function buildDataset(buf, fileName, footer) {
    const t0 = performance.now();
    if (!footer) {
      checkMagic(buf);
      let md;
      try {
        md = hyparquet.parquetMetadata(buf);
      } catch (e) {
        throw new UserError('Could not read the Parquet footer: ' + e.message);
      }
      footer = checkFooter(md);
    }
    const { md, meta, n, colNames, metaTokens, grouped } = footer;
    const posColumn = grouped ? 'group_index' : 'token_position';
    let tRead = performance.now();
    let step, layer, variant, prompt, tok;
    const pos = new Int32Array(n);
    const l2 = new Float32Array(n);
    try {
      step = readCategorical(buf, md, 'generation_step', n);
      layer = readCategorical(buf, md, 'layer', n);
      variant = readCategorical(buf, md, 'variant', n);
      prompt = colNames.has('prompt_name') ? readCategorical(buf, md, 'prompt_name', n) : null;
      readNumeric(buf, md, posColumn, pos, -1);
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
      if (q < 0) throw new UserError(`Row ${r} has no ${posColumn}.`);
    }
    if (maxPos > 5e6) throw new UserError(`${posColumn} ${maxPos} is implausibly large.`);
    if (grouped && maxPos >= meta.groups.length) throw new UserError(`Row group_index ${maxPos} is not in the metadata's ${meta.groups.length} groups.`);
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
    } else if (grouped) {
      prompts[0].texts = Array.from({ length: maxPos + 1 }, (_, g) => String(meta.groups[g].label || `group ${g}`));
    } else {
      prompts[0].texts = metaTexts(metaTokens, maxPos);
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
      pr.generated = meta ? metaGenerated(meta, stepS.values) : new Array(S).fill(null);
      for (let s = 0; s < S; s++) {
        if (!meta && s + 1 < S && pr.stepLen[s + 1] > pr.stepLen[s]) pr.generated[s] = pr.texts[pr.stepLen[s]];
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
      mode: 'whole', fileName, buf, md, meta, n, pos, perm, offsets, grouped,
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

  // ------------------------------------------------------------ byte sources

  // Row groups of more rows than this are only read when a view asks for them
  // (see prefetch and memoDecode).
  const PREFETCH_MAX_ROWS = 2000000;

  /**
   * Where a file's bytes come from, in the shape of hyparquet's AsyncBuffer
   * (byteLength, slice(start, end) -> Promise<ArrayBuffer>) plus whole(): a
   * local File read in slices (File.slice: only the asked bytes are read), or
   * an ArrayBuffer already in memory (the data of a `maskvl view` page).
   */
  function fileSource(file) {
    return {
      byteLength: file.size,
      slice: (start, end) => file.slice(start, end).arrayBuffer(),
      whole: () => file.arrayBuffer(),
    };
  }
  function bufferSource(buf) {
    return {
      byteLength: buf.byteLength,
      slice: (start, end) => Promise.resolve(buf.slice(start, end)),
      whole: () => Promise.resolve(buf),
    };
  }

  /** Check the magic bytes and read the footer of a source: checkFooter's record. */
  async function readFooter(src) {
    if (src.byteLength < 12) throw new UserError('This file is too small to be a Parquet file.');
    const head = await src.slice(0, 4);
    const tail = await src.slice(src.byteLength - 4, src.byteLength);
    const both = new Uint8Array(8);
    both.set(new Uint8Array(head), 0);
    both.set(new Uint8Array(tail), 4);
    const magic = (o) => String.fromCharCode(both[o], both[o + 1], both[o + 2], both[o + 3]);
    if (magic(0) !== 'PAR1' || magic(4) !== 'PAR1') {
      throw new UserError('This is not a Parquet file (the PAR1 magic bytes are missing at its start or end; it may be truncated or another format).');
    }
    let md;
    try {
      md = await hyparquet.parquetMetadataAsync(src);
    } catch (e) {
      throw new UserError('Could not read the Parquet footer: ' + e.message);
    }
    return checkFooter(md);
  }

  // -------------------------------------------------- opening: whole or lazy

  /**
   * Open a file for viewing. Files of fewer than `opts.lazyMinRows` rows, and files
   * without what on-demand reading needs, are read whole at once (every key is
   * then instant). Larger maskvl files are read lazily: the footer now, then
   * the row groups of the (step, layer) on screen when asked (see ensure),
   * found by their column statistics (min/max of generation_step and layer).
   */
  async function openDataset(src, fileName, opts) {
    const t0 = performance.now();
    const footer = await readFooter(src);
    const lazy = footer.n >= opts.lazyMinRows && !footer.grouped ? lazyPlan(footer) : null;
    if (lazy) return makeLazy(src, fileName, footer, lazy, opts, performance.now() - t0);
    const buf = await src.whole();
    return buildDataset(buf, fileName, footer);
  }

  /** Minimum and maximum of a column chunk's statistics as numbers, or null. */
  function chunkRange(rg, name) {
    const c = rg.columns.find((x) => x.meta_data && x.meta_data.path_in_schema.length === 1 && x.meta_data.path_in_schema[0] === name);
    const st = c && c.meta_data.statistics;
    if (!st) return null;
    const lo = st.min_value !== undefined ? st.min_value : st.min;
    const hi = st.max_value !== undefined ? st.max_value : st.max;
    if (lo === undefined || hi === undefined || lo === null || hi === null) return null;
    const a = Number(lo), b = Number(hi);
    return Number.isInteger(a) && Number.isInteger(b) && a <= b ? [a, b] : null;
  }

  /**
   * What lazy reading needs, or null: maskvl metadata with the token and
   * variant lists (the rows are not scanned for them), and in every row group
   * the statistics of generation_step and layer (which keys it holds) and of
   * token_position (how long each step's sequence is).
   */
  function lazyPlan(footer) {
    const { md, meta, metaTokens } = footer;
    if (!meta || !metaTokens || !Array.isArray(meta.variants) || !meta.variants.some((v) => typeof v === 'string')) return null;
    const groups = [];
    for (let g = 0; g < md.row_groups.length; g++) {
      const rg = md.row_groups[g];
      const rows = Number(rg.num_rows);
      if (!rows) continue;
      const step = chunkRange(rg, 'generation_step'), layer = chunkRange(rg, 'layer'), pos = chunkRange(rg, 'token_position');
      // ranges far wider than any sweep mean the statistics are not usable here
      if (!step || !layer || !pos || step[1] - step[0] > 4096 || layer[1] - layer[0] > 4096 || step[0] < 0 || pos[0] < 0) return null;
      groups.push({ g, rows, step, layer, maxPos: pos[1] });
    }
    return groups.length ? { groups } : null;
  }

  /** Sorted distinct integers covered by a list of [lo, hi] ranges. */
  function rangeValues(ranges) {
    const set = new Set();
    for (const [a, b] of ranges) for (let x = a; x <= b; x++) set.add(x);
    return [...set].sort((x, y) => x - y);
  }

  /** The dataset of a lazily read file: its shape from the footer, no rows yet. */
  function makeLazy(src, fileName, footer, plan, opts, footerMs) {
    const { md, meta, n, colNames, metaTokens } = footer;
    const steps = rangeValues(plan.groups.map((x) => x.step));
    // Layers: the metadata's list where a row group covers them (a sweep may measure some layers
    // only), else every integer the row groups' ranges cover.
    const inRange = (l) => plan.groups.some((x) => l >= x.layer[0] && l <= x.layer[1]);
    let layers = Array.isArray(meta.layers) ? meta.layers.filter((l) => Number.isInteger(l) && inRange(l)) : [];
    layers = layers.length ? [...new Set(layers)].sort((x, y) => x - y) : rangeValues(plan.groups.map((x) => x.layer));
    const listed = [...new Set(meta.variants.filter((v) => typeof v === 'string'))];
    const variants = variantOrder(listed, listed);
    const S = steps.length, L = layers.length, V = variants.length;
    const stepIndex = new Map(steps.map((v, i) => [v, i]));
    const layerIndex = new Map(layers.map((v, i) => [v, i]));
    const variantIndex = new Map(variants.map((v, i) => [v, i]));
    const firstAtLeast = (arr, x) => { let i = 0; while (i < arr.length && arr[i] < x) i++; return i; };
    const lastAtMost = (arr, x) => { let i = arr.length - 1; while (i >= 0 && arr[i] > x) i--; return i; };
    const keyGroups = Array.from({ length: S * L }, () => []);
    const stepLen = new Int32Array(S);
    const groups = plan.groups.map((x) => {
      const grp = {
        g: x.g, rows: x.rows,
        sLo: firstAtLeast(steps, x.step[0]), sHi: lastAtMost(steps, x.step[1]),
        lLo: firstAtLeast(layers, x.layer[0]), lHi: lastAtMost(layers, x.layer[1]),
      };
      for (let s = grp.sLo; s <= grp.sHi; s++) {
        for (let l = grp.lLo; l <= grp.lHi; l++) keyGroups[s * L + l].push(grp);
        // a group of one step gives that step's length exactly: 1 + its largest position
        if (grp.sLo === grp.sHi) stepLen[s] = Math.max(stepLen[s], x.maxPos + 1);
      }
      return grp;
    });
    // Steps that share row groups: the metadata's tokens cover the last step's
    // sequence, which grows by one token per step.
    const lastStep = steps[S - 1];
    for (let s = 0; s < S; s++) if (!stepLen[s]) stepLen[s] = Math.max(0, metaTokens.length - (lastStep - steps[s]));
    let maxPos = -1;
    for (let s = 0; s < S; s++) maxPos = Math.max(maxPos, stepLen[s] - 1);
    const texts = metaTexts(metaTokens, maxPos);
    const prompt = {
      name: null, text: typeof meta.prompt === 'string' ? meta.prompt : null, firstRow: -1, texts, maxPos, stepLen,
      generated: metaGenerated(meta, steps),
    };
    const optional = ['kl_divergence', 'target_prob_delta'].filter((c) => colNames.has(c));
    return {
      mode: 'lazy', fileName, src, md, meta, n,
      steps, layers, variants, prompts: [prompt], S, L, V, P: 1,
      optional, metrics: new Set(['l2_distance', 'cosine_distance'].concat(optional)), hasConfigPrompt: false,
      groups, keyGroups, stepIndex, layerIndex, variantIndex,
      // decoded row groups, least recently used first; `keep` holds the groups on screen
      cache: new Map(), cacheBytes: 0, budget: opts.cacheBytes, keep: new Set(), inflight: new Map(),
      viewLoads: 0, idleWaiters: [], series: new Map(), memo: new Map(),
      timings: { footer: footerMs, parse: footerMs, read: 0, index: 0 },
      stats: { groupsRead: 0, bytesRead: 0, readMs: 0, decodeMs: 0 },
    };
  }

  // ------------------------------------------------------- lazy row groups

  /**
   * Read column chunks of row group g: { name: { buf, md } }, where md is a
   * one-group metadata whose offsets point into buf, for scanFlatColumn.
   */
  async function readChunks(ds, g, names) {
    const rg = ds.md.row_groups[g];
    const out = {};
    await Promise.all(names.map(async (name) => {
      const chunk = rg.columns.find((c) => c.meta_data && c.meta_data.path_in_schema.length === 1 && c.meta_data.path_in_schema[0] === name);
      if (!chunk) throw new UserError(`Column ${name} is missing from row group ${g}.`);
      if (chunk.file_path) throw new UserError('Parquet files with external column chunks are not supported.');
      const m = chunk.meta_data;
      const start = Number(m.dictionary_page_offset || m.data_page_offset);
      const end = start + Number(m.total_compressed_size);
      if (start < 4 || end > ds.src.byteLength) throw new UserError(`Row group ${g} lies outside the file (truncated file?).`);
      // Read from 4 bytes before the chunk (the file's leading 'PAR1' guarantees them) so that
      // no rebased offset is 0: scanFlatColumn takes a dictionary_page_offset of 0 for absent.
      const base = start - 4;
      const buf = await ds.src.slice(base, end);
      ds.stats.bytesRead += buf.byteLength;
      const meta = { ...m, data_page_offset: Number(m.data_page_offset) - base, dictionary_page_offset: undefined };
      if (m.dictionary_page_offset) meta.dictionary_page_offset = Number(m.dictionary_page_offset) - base;
      const one = { schema: ds.md.schema, row_groups: [{ num_rows: rg.num_rows, columns: [{ ...chunk, meta_data: meta }] }] };
      out[name] = { buf, md: one };
    }));
    return out;
  }

  /**
   * Decode a column chunk, or reuse the decoded value of a byte-identical chunk
   * read before: { value, hit }. Files written one row group per (step, layer)
   * repeat the same token_position and variant chunks in every layer of a
   * step, so a layer's positions are decoded (and held in memory) once per
   * step. Callers must not modify the shared value.
   */
  function memoDecode(ds, chunk, decode) {
    // only for groups of the size read ahead: a few decoded values of million-row groups
    // would hold hundreds of MB beyond the cache's budget
    if (Number(chunk.md.row_groups[0].num_rows) > PREFETCH_MAX_ROWS) return { value: decode(), hit: false };
    const bytes = new Uint8Array(chunk.buf);
    const name = chunk.md.row_groups[0].columns[0].meta_data.path_in_schema[0];
    const list = ds.memo.get(name) || [];
    for (const m of list) {
      if (m.bytes.length !== bytes.length) continue;
      let same = true;
      for (let i = 0; i < bytes.length; i++) if (m.bytes[i] !== bytes[i]) { same = false; break; }
      if (same) return { value: m.value, hit: true };
    }
    const value = decode();
    list.unshift({ bytes, value });
    if (list.length > 4) list.pop();
    ds.memo.set(name, list);
    return { value, hit: false };
  }

  /** Map the ids of a categorical column to the dataset's indices (-1: not one of them). */
  function remapIds(cat, index) {
    return Int32Array.from(cat.values, (v) => (index.has(v) ? index.get(v) : -1));
  }

  /**
   * Read and index row group `grp` for `metric`: an entry with the positions,
   * the metric's values and, per local key (step, layer, variant inside the
   * group), the rows offsets[k]..offsets[k+1] (through perm, or in file order
   * when the rows are already sorted by key, as maskvl writes them).
   */
  async function readGroup(ds, grp, metric) {
    const t0 = performance.now();
    const names = ['token_position', 'variant', metric];
    const mixedSteps = grp.sLo !== grp.sHi, mixedLayers = grp.lLo !== grp.lHi;
    if (mixedSteps) names.push('generation_step');
    if (mixedLayers) names.push('layer');
    let chunks;
    try {
      chunks = await readChunks(ds, grp.g, names);
    } catch (e) {
      if (e instanceof UserError) throw e;
      throw new UserError(`Could not read row group ${grp.g} of the file: ${e.message}`);
    }
    const t1 = performance.now();
    const n = grp.rows;
    const col = new Float32Array(n);
    let pos, vIds, vMap, sIds, sMap, lIds, lMap, shared = 0;
    try {
      const posMemo = memoDecode(ds, chunks.token_position, () => readNumeric(chunks.token_position.buf, chunks.token_position.md, 'token_position', new Int32Array(n), -1));
      pos = posMemo.value;
      if (posMemo.hit) shared += pos.byteLength;
      readNumeric(chunks[metric].buf, chunks[metric].md, metric, col, NaN);
      const vc = memoDecode(ds, chunks.variant, () => readCategorical(chunks.variant.buf, chunks.variant.md, 'variant', n)).value;
      vIds = vc.ids; vMap = remapIds(vc, ds.variantIndex);
      if (mixedSteps) { const c = readCategorical(chunks.generation_step.buf, chunks.generation_step.md, 'generation_step', n); sIds = c.ids; sMap = remapIds(c, ds.stepIndex); }
      if (mixedLayers) { const c = readCategorical(chunks.layer.buf, chunks.layer.md, 'layer', n); lIds = c.ids; lMap = remapIds(c, ds.layerIndex); }
    } catch (e) {
      if (e instanceof UserError) throw e;
      throw new UserError(`Could not decode row group ${grp.g} of the file: ${e.message}`);
    }
    // counting sort by local key; rows of other keys (a variant the metadata does not list) go last
    const V = ds.V, nL = grp.lHi - grp.lLo + 1;
    const K = (grp.sHi - grp.sLo + 1) * nL * V;
    const key = new Int32Array(n);
    const counts = new Int32Array(K + 2);
    let sorted = true, last = -1;
    for (let r = 0; r < n; r++) {
      const v = vMap[vIds[r]];
      const s = mixedSteps ? sMap[sIds[r]] : grp.sLo;
      const l = mixedLayers ? lMap[lIds[r]] : grp.lLo;
      const k = v < 0 || s < 0 || l < 0 ? K : ((s - grp.sLo) * nL + (l - grp.lLo)) * V + v;
      key[r] = k;
      counts[k + 1]++;
      if (k < last) sorted = false;
      last = k;
    }
    for (let k = 0; k <= K; k++) counts[k + 1] += counts[k];
    const offsets = counts; // offsets[k]..offsets[k+1]
    let perm = null;
    if (!sorted) {
      perm = new Int32Array(n);
      const fill = offsets.slice(0, K + 1);
      for (let r = 0; r < n; r++) perm[fill[key[r]]++] = r;
    }
    const entry = { grp, n, pos, perm, offsets, nL, cols: { [metric]: col }, bytes: 0 };
    entry.bytes = pos.byteLength - shared + col.byteLength + offsets.byteLength + (perm ? perm.byteLength : 0);
    ds.stats.groupsRead++;
    ds.stats.readMs += t1 - t0;
    ds.stats.decodeMs += performance.now() - t1;
    return entry;
  }

  /** A metric's column of row group g (n rows) as a Float32Array, nulls as NaN. */
  async function readColumn(ds, g, metric, n) {
    const chunks = await readChunks(ds, g, [metric]);
    const col = new Float32Array(n);
    try {
      readNumeric(chunks[metric].buf, chunks[metric].md, metric, col, NaN);
    } catch (err) {
      throw new UserError(`Could not decode column ${metric} of row group ${g}: ${err.message}`);
    }
    return col;
  }

  /** Add a metric's column to a cached entry. */
  async function readEntryColumn(ds, e, metric) {
    const col = await readColumn(ds, e.grp.g, metric, e.n);
    if (e.cols[metric]) return;
    e.cols[metric] = col;
    e.bytes += col.byteLength;
    if (ds.cache.get(e.grp.g) === e) ds.cacheBytes += col.byteLength;
  }

  /** Put an entry in the cache (most recently used) and evict what exceeds the budget. */
  function cachePut(ds, e) {
    if (ds.cache.has(e.grp.g)) return;
    ds.cache.set(e.grp.g, e);
    ds.cacheBytes += e.bytes;
    for (const [g, old] of ds.cache) {
      if (ds.cacheBytes <= ds.budget) break;
      if (ds.keep.has(g) || old === e) continue;
      ds.cache.delete(g);
      ds.cacheBytes -= old.bytes;
    }
  }

  function touch(ds, e) { ds.cache.delete(e.grp.g); ds.cache.set(e.grp.g, e); }

  /** A cached entry of group grp with `metric` read, loading what is missing. */
  async function groupEntry(ds, grp, metric) {
    let e = ds.cache.get(grp.g);
    if (!e) {
      let p = ds.inflight.get(grp.g);
      if (!p) {
        p = readGroup(ds, grp, metric).then((x) => { cachePut(ds, x); return x; });
        ds.inflight.set(grp.g, p);
        p.then(() => ds.inflight.delete(grp.g), () => ds.inflight.delete(grp.g));
      }
      e = await p;
      if (!ds.cache.has(grp.g)) cachePut(ds, e); // evicted while another caller waited
    }
    if (!e.cols[metric]) {
      const key = grp.g + '|' + metric;
      let p = ds.inflight.get(key);
      if (!p) {
        p = readEntryColumn(ds, e, metric);
        ds.inflight.set(key, p);
        p.then(() => ds.inflight.delete(key), () => ds.inflight.delete(key));
      }
      await p;
    }
    if (ds.cache.get(grp.g) === e) touch(ds, e); else cachePut(ds, e);
    return e;
  }

  // -------------------------------------------- one interface, both modes

  /** Whether the file has this metric column. */
  function hasMetric(ds, metric) {
    if (ds.mode === 'lazy') return ds.metrics.has(metric);
    return !!(ds.columns[metric] || ds.pending[metric]);
  }

  /** True when every (step, layer) of `pairs` ([{s, l}]) can be drawn now for `metric`. */
  function isReady(ds, pairs, metric) {
    if (ds.mode !== 'lazy') return true;
    for (const { s, l } of pairs) {
      for (const grp of ds.keyGroups[s * ds.L + l]) {
        const e = ds.cache.get(grp.g);
        if (!e || !e.cols[metric]) return false;
      }
    }
    return true;
  }

  /**
   * Load what drawing `pairs` for `metric` needs (lazy files; a no-op for
   * files read whole). The groups of these pairs become the ones on screen,
   * which the cache never evicts.
   */
  async function ensure(ds, pairs, metric) {
    if (ds.mode !== 'lazy') return;
    const grps = [];
    for (const { s, l } of pairs) for (const grp of ds.keyGroups[s * ds.L + l]) if (!grps.includes(grp)) grps.push(grp);
    ds.keep = new Set(grps.map((x) => x.g));
    ds.viewLoads++;
    try {
      await Promise.all(grps.map((grp) => groupEntry(ds, grp, metric)));
    } finally {
      ds.viewLoads--;
      if (!ds.viewLoads) { const w = ds.idleWaiters.splice(0); for (const f of w) f(); }
    }
  }

  /** Resolves when no view is waiting for a load (background work yields to views). */
  function viewsIdle(ds) {
    return new Promise((resolve) => {
      const go = () => setTimeout(resolve, 0);
      if (ds.mode !== 'lazy' || !ds.viewLoads) go(); else ds.idleWaiters.push(go);
    });
  }

  /**
   * The row ranges holding (prompt p, step s, layer l, variant v): a list of
   * { pos, col, perm, lo, hi }; row r = perm ? perm[j] : j for j in lo..hi-1
   * has position pos[r] and value col[r]. Call when isReady.
   */
  function segments(ds, p, s, l, v, metric) {
    if (ds.mode !== 'lazy') {
      const col = metricColumn(ds, metric);
      const k = ((p * ds.S + s) * ds.L + l) * ds.V + v;
      return col ? [{ pos: ds.pos, col, perm: ds.perm, lo: ds.offsets[k], hi: ds.offsets[k + 1] }] : [];
    }
    const out = [];
    for (const grp of ds.keyGroups[s * ds.L + l]) {
      const e = ds.cache.get(grp.g);
      if (!e || !e.cols[metric]) continue;
      out.push(entrySegment(ds, e, s, l, v, metric));
    }
    return out;
  }

  function entrySegment(ds, e, s, l, v, metric) {
    const k = ((s - e.grp.sLo) * e.nL + (l - e.grp.lLo)) * ds.V + v;
    return { pos: e.pos, col: e.cols[metric], perm: e.perm, lo: e.offsets[k], hi: e.offsets[k + 1] };
  }

  // --------------------------------------------------- background reading

  /**
   * After a view is drawn: read more row groups while the page is idle. First
   * the neighbouring layers and steps of the view (the arrow keys' next
   * targets), then every other group, nearest layers first, as long as the
   * cache has room without evicting anything: when the whole file fits, every
   * key is then instant (ds.allLoaded). Groups of millions of rows (files of
   * one row group per step) are left to be read when asked: decoding one
   * holds up the page's thread for seconds. Yields to view loads between
   * groups; stops when isCurrent() turns false. Resolves true when it read
   * all it meant to.
   */
  async function prefetch(ds, s, l, metric, isCurrent) {
    if (ds.mode !== 'lazy') return true;
    const order = [];
    const add = (ss, ll) => {
      if (ss < 0 || ll < 0 || ss >= ds.S || ll >= ds.L) return;
      for (const grp of ds.keyGroups[ss * ds.L + ll]) if (!order.includes(grp)) order.push(grp);
    };
    add(s, l + 1); add(s, l - 1); add(s + 1, l); add(s - 1, l);
    const near = order.length;
    for (let d = 2; d < ds.L; d++) { add(s, l + d); add(s, l - d); }
    for (let ss = 0; ss < ds.S; ss++) for (let d = 0; d < ds.L; d++) { add(ss, l + d); add(ss, l - d); }
    let complete = true;
    for (let i = 0; i < order.length; i++) {
      const grp = order[i];
      const e = ds.cache.get(grp.g);
      if (e && e.cols[metric]) continue;
      if (grp.rows > PREFETCH_MAX_ROWS) { complete = false; continue; }
      // beyond the neighbours, only into free room (at least the metric's 4 bytes a row;
      // the positions are often shared with a group read before)
      if (i >= near && ds.cacheBytes + grp.rows * 4 > ds.budget) { complete = false; break; }
      await viewsIdle(ds);
      if (!isCurrent()) return false;
      await groupEntry(ds, grp, metric);
    }
    if (complete && isCurrent() && ds.groups.every((x) => ds.cache.has(x.g))) ds.allLoaded = true;
    return true;
  }

  /**
   * Values of one (variant, metric) at every (step, layer) and position, for
   * the pinned token's chart: { vals (Float32Array [S, L, nPos], NaN = not
   * read), done (Uint8Array [S, L]), remaining }. Files read whole fill it at
   * once; lazy files from the cache, then `fill` reads the other row groups
   * one at a time without caching them (calling onProgress after each).
   */
  function pinSeries(ds, p, v, metric) {
    const nPos = ds.prompts[p].maxPos + 1;
    const id = `${p}|${v}|${metric}`;
    let ser = ds.mode === 'lazy' ? ds.series.get(id) : null;
    if (!ser) {
      ser = {
        id, p, v, metric, nPos, vals: new Float32Array(ds.S * ds.L * nPos).fill(NaN), done: new Uint8Array(ds.S * ds.L),
        got: new Uint8Array(ds.S * ds.L), remaining: ds.S * ds.L, filling: false,
      };
      if (ds.mode === 'lazy') {
        // one series at a time is kept (7 MB for 36 layers, 3 steps and 16k positions)
        ds.series.clear();
        ds.series.set(id, ser);
      }
    }
    for (let s = 0; s < ds.S; s++) {
      for (let l = 0; l < ds.L; l++) {
        if (ser.done[s * ds.L + l] || !isReady(ds, [{ s, l }], metric)) continue;
        for (const sg of segments(ds, p, s, l, v, metric)) seriesTake(ser, s * ds.L + l, sg);
        ser.done[s * ds.L + l] = 1;
        ser.remaining--;
      }
    }
    return ser;
  }

  function seriesTake(ser, sl, sg) {
    const { pos, col, perm, lo, hi } = sg;
    const base = sl * ser.nPos;
    for (let j = lo; j < hi; j++) {
      const r = perm ? perm[j] : j;
      const q = pos[r];
      if (q < ser.nPos) ser.vals[base + q] = col[r];
    }
  }

  /** Read the row groups a lazy series still lacks (see pinSeries). */
  async function fillSeries(ds, ser, isCurrent, onProgress) {
    if (ser.filling || !ser.remaining) return;
    ser.filling = true;
    ser.got.fill(0); // groups read per key in this pass (a key may span several groups)
    try {
      for (const grp of ds.groups) {
        const keys = [];
        for (let s = grp.sLo; s <= grp.sHi; s++) for (let l = grp.lLo; l <= grp.lHi; l++) if (!ser.done[s * ds.L + l]) keys.push([s, l]);
        if (!keys.length) continue;
        await viewsIdle(ds);
        if (!isCurrent()) return;
        // a cached group lacks at most the metric's column: read only that (kept if there is room)
        let e = ds.cache.get(grp.g), col = e && e.cols[ser.metric];
        if (e && !col) {
          if (ds.cacheBytes + e.n * 4 <= ds.budget) { await readEntryColumn(ds, e, ser.metric); col = e.cols[ser.metric]; }
          else col = await readColumn(ds, grp.g, ser.metric, e.n);
        } else if (!e) {
          e = await readGroup(ds, grp, ser.metric);
          col = e.cols[ser.metric];
          if (ds.cacheBytes + e.bytes <= ds.budget) cachePut(ds, e);
        }
        const view = { ...e, cols: { [ser.metric]: col } };
        for (const [s, l] of keys) {
          const sl = s * ds.L + l;
          seriesTake(ser, sl, entrySegment(ds, view, s, l, ser.v, ser.metric));
          // a key held by several groups is complete when all of them were read
          if (++ser.got[sl] === ds.keyGroups[sl].length) { ser.done[sl] = 1; ser.remaining--; }
        }
        if (isCurrent()) onProgress();
      }
    } finally {
      ser.filling = false;
    }
  }

  // ----------------------------------------------------------------- layout

  /** Whether an image is one contiguous grid covering it (version 1, the Qwen line), drawn stretched
   * over the picture; else it is drawn grid by grid at the grids' boxes (tiledEntries). */
  function plainImage(im) {
    const grids = Array.isArray(im.grids) ? im.grids : [];
    if (!grids.length) return true;
    const g0 = grids[0];
    return grids.length === 1 && !!g0 && g0.kind === 'image' && (g0.row_stride === undefined || g0.row_stride === g0.cols)
      && Array.isArray(g0.box) && Array.isArray(im.original_size) && g0.box[0] === 0 && g0.box[1] === 0
      && g0.box[2] === im.original_size[0] && g0.box[3] === im.original_size[1];
  }

  /**
   * The drawn entries of an image with several grids (format version 2: a base
   * view or thumbnail beside tiles): one entry per base/thumbnail grid over the
   * whole picture, and one "mosaic" entry whose parts are the tiles, each drawn
   * at its box over the picture. A part: { rows, cols, start, stride, offset
   * (its first cell within the entry), rect [x0, y0, x1, y1] (0..1 of the
   * entry's extent), grid (its index in the image's grids), kind }. An entry's
   * rows × cols is the cell raster it is sized by (the finest part's density
   * over the extent); `count` its cells; `photo` the picture's rect in it.
   */
  function tiledEntries(im, i, grids) {
    const orig = Array.isArray(im.original_size) && im.original_size.every((x) => x > 0) ? im.original_size : null;
    const checked = grids.map((g, gi) => {
      const ok = g && [g.rows, g.cols, g.token_start].every(Number.isInteger) && g.rows > 0 && g.cols > 0
        && (g.row_stride === undefined || (Number.isInteger(g.row_stride) && g.row_stride >= g.cols))
        && Array.isArray(g.box) && g.box.length === 4 && g.box.every(Number.isFinite) && g.box[2] > g.box[0] && g.box[3] > g.box[1];
      if (!ok) throw new UserError(`Image ${i}, grid ${gi} in the metadata is inconsistent (${JSON.stringify(g).slice(0, 120)}).`);
      return { rows: g.rows, cols: g.cols, start: g.token_start, stride: g.row_stride === undefined ? g.cols : g.row_stride,
        box: g.box, grid: gi, kind: typeof g.kind === 'string' ? g.kind : 'tile' };
    });
    const [W, H] = orig || [checked[0].box[2], checked[0].box[3]];
    const entry = (kind, parts) => {
      // the extent: the picture and every part's box (a box may reach into the processor's padding)
      const ex = [0, 0, W, H];
      for (const p of parts) { ex[0] = Math.min(ex[0], p.box[0]); ex[1] = Math.min(ex[1], p.box[1]); ex[2] = Math.max(ex[2], p.box[2]); ex[3] = Math.max(ex[3], p.box[3]); }
      const ew = ex[2] - ex[0], eh = ex[3] - ex[1];
      const norm = (b) => [(b[0] - ex[0]) / ew, (b[1] - ex[1]) / eh, (b[2] - ex[0]) / ew, (b[3] - ex[1]) / eh];
      let offset = 0, perW = 0, perH = 0;
      const out = parts.map((p) => {
        const rect = norm(p.box);
        perW = Math.max(perW, p.cols / (rect[2] - rect[0]));
        perH = Math.max(perH, p.rows / (rect[3] - rect[1]));
        const part = Object.assign({}, p, { rect, offset });
        offset += p.rows * p.cols;
        return part;
      });
      const cols = Math.max(1, Math.round(perW)), rows = Math.max(1, Math.round(perH));
      return { kind, parts: out, rows, cols, start: out[0].start, count: offset, resized: [ew, eh], photo: norm([0, 0, W, H]) };
    };
    const entries = checked.filter((g) => g.kind !== 'tile').map((g) => entry(g.kind, [g]));
    const tiles = checked.filter((g) => g.kind === 'tile');
    if (tiles.length) entries.unshift(entry('mosaic', tiles));
    return entries;
  }

  /**
   * Where each position of a prompt goes: image cell or text chip.
   * Uses metadata images when present, else detects image tokens by name.
   * Each entry of `images` is one grid drawn (`entry` its index); `index` is
   * the image it shows.
   */
  function buildLayout(ds, p, override) {
    if (ds.grouped) return buildGroupLayout(ds, override);
    const pr = ds.prompts[p];
    const nPos = pr.maxPos + 1;
    const posImg = new Int16Array(nPos).fill(-1);
    const posCell = new Int32Array(nPos).fill(-1);
    const images = [];
    const meta = ds.meta;
    let msg = '';
    if (meta && Array.isArray(meta.images) && meta.images.length) {
      meta.images.forEach((im, i) => {
        const base = {
          index: i, positions: null,
          path: typeof im.path === 'string' ? im.path : null,
          resized: Array.isArray(im.resized_size) ? im.resized_size : null,
          original: Array.isArray(im.original_size) ? im.original_size : null,
        };
        const grids = Array.isArray(im.grids) ? im.grids : [];
        const g0 = grids.length === 1 ? grids[0] : null;
        if (!plainImage(im)) {
          // tiles, a base view or thumbnail, a grid with separators inside, or one reaching into padding
          for (const e of tiledEntries(im, i, grids)) images.push(Object.assign({}, base, e));
          return;
        }
        // One contiguous grid covering the image (format version 1, and the Qwen line in version 2).
        const rows = g0 ? g0.rows : im.grid_rows, cols = g0 ? g0.cols : im.grid_cols;
        const start = g0 ? g0.token_start : im.token_start, end = g0 ? g0.token_end : im.token_end;
        if (![rows, cols, start, end].every(Number.isInteger) || rows <= 0 || cols <= 0 || end - start !== rows * cols) {
          throw new UserError(`Image ${i} in the metadata is inconsistent (grid ${rows}×${cols}, tokens ${start}..${end}).`);
        }
        images.push(Object.assign(base, { kind: 'image', rows, cols, start, count: end - start }));
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
      if (im.parts) {
        // A tiled image's grids: each part's cells in its own row-major order, rows `stride` apart.
        for (const pt of im.parts) {
          for (let k = 0; k < pt.rows * pt.cols; k++) {
            const q = pt.start + Math.floor(k / pt.cols) * pt.stride + (k % pt.cols);
            if (q < nPos) { posImg[q] = i; posCell[q] = cellBase + pt.offset + k; }
          }
        }
        cellBase += im.count;
        return;
      }
      for (let k = 0; k < im.count; k++) {
        const q = im.start + k;
        if (q < nPos) { posImg[q] = i; posCell[q] = cellBase + k; }
      }
      cellBase += im.rows * im.cols;
    });
    images.forEach((im, i) => { im.entry = i; });
    const textPositions = [];
    for (let q = 0; q < nPos; q++) {
      if (posImg[q] < 0 && pr.texts[q] !== null) { posCell[q] = textPositions.length; textPositions.push(q); }
    }
    return { p, images, posImg, posCell, textPositions, totalCells: cellBase, msg };
  }

  /**
   * The layout of a group run: the "positions" are groups. A group within one
   * image covers all of its members' cells; groups of different specs may
   * overlap (images and blocks:4x4), so each (image, spec) gets its own grid
   * (entry), and a group outside any single image is a chip labelled with it.
   * posCells[g] lists a group's cells; posCell[g] is its first cell (or chip).
   */
  function buildGroupLayout(ds, override) {
    const meta = ds.meta, pr = ds.prompts[0];
    const nG = pr.maxPos + 1;
    const posImg = new Int16Array(nG).fill(-1);
    const posCell = new Int32Array(nG).fill(-1);
    const posCells = new Array(nG).fill(null);
    const images = [];
    const entryOf = new Map();
    let cellBase = 0;
    // A tiled image's panels (tiledEntries) and where each of its positions is drawn: [panel, cell].
    const tiled = new Map();
    const panelsOf = (i) => {
      let t = tiled.get(i);
      if (!t) {
        const im = meta.images[i];
        t = { panels: tiledEntries(im, i, im.grids), at: new Map() };
        t.panels.forEach((e, pi) => e.parts.forEach((pt) => {
          for (let k = 0; k < pt.rows * pt.cols; k++) t.at.set(pt.start + Math.floor(k / pt.cols) * pt.stride + (k % pt.cols), [pi, pt.offset + k]);
        }));
        tiled.set(i, t);
      }
      return t;
    };
    for (let g = 0; g < nG; g++) {
      const grp = meta.groups[g];
      if (grp.image_index === null) continue;
      const im = meta.images[grp.image_index];
      if (!plainImage(im)) {
        // Each of the group's cells in the panel (tile mosaic, base view, thumbnail) that draws it.
        const t = panelsOf(grp.image_index);
        const cells = [];
        for (const q of grp.positions) {
          const at = t.at.get(q);
          if (!at) throw new UserError(`Group ${g} lists position ${q}, not a token of image ${grp.image_index}.`);
          const key = grp.image_index + '|' + grp.spec + '|' + at[0];
          let e = entryOf.get(key);
          if (e === undefined) {
            e = images.length;
            entryOf.set(key, e);
            const panel = t.panels[at[0]];
            images.push(Object.assign({
              index: grp.image_index, positions: null,
              path: typeof im.path === 'string' ? im.path : null,
              original: Array.isArray(im.original_size) ? im.original_size : null,
            }, panel, { entry: e, spec: String(grp.spec), cellBase, cellGroup: new Int32Array(panel.count).fill(-1), groups: [] }));
            cellBase += panel.count;
          }
          const entry = images[e];
          entry.cellGroup[at[1]] = g;
          if (entry.groups[entry.groups.length - 1] !== g) entry.groups.push(g);
          if (posImg[g] < 0) posImg[g] = e;
          cells.push(entry.cellBase + at[1]);
        }
        posCells[g] = Int32Array.from(cells);
        posCell[g] = cells.length ? cells[0] : -1;
        continue;
      }
      const rows = im.grid_rows, cols = im.grid_cols, start = im.token_start, end = im.token_end;
      if (![rows, cols, start, end].every(Number.isInteger) || rows <= 0 || cols <= 0 || end - start !== rows * cols) {
        throw new UserError(`Image ${grp.image_index} in the metadata is inconsistent (grid ${rows}×${cols}, tokens ${start}..${end}).`);
      }
      const key = grp.image_index + '|' + grp.spec;
      let e = entryOf.get(key);
      if (e === undefined) {
        e = images.length;
        entryOf.set(key, e);
        images.push({
          entry: e, index: grp.image_index, spec: String(grp.spec), rows, cols, start, count: rows * cols, cellBase,
          cellGroup: new Int32Array(rows * cols).fill(-1), groups: [], positions: null,
          path: typeof im.path === 'string' ? im.path : null,
          resized: Array.isArray(im.resized_size) ? im.resized_size : null,
          original: Array.isArray(im.original_size) ? im.original_size : null,
        });
        cellBase += rows * cols;
      }
      const entry = images[e];
      const cells = [];
      for (const q of grp.positions) {
        const k = q - start;
        if (k < 0 || k >= rows * cols) throw new UserError(`Group ${g} lists position ${q}, outside image ${grp.image_index}.`);
        entry.cellGroup[k] = g;
        cells.push(entry.cellBase + k);
      }
      entry.groups.push(g);
      posImg[g] = e;
      posCells[g] = Int32Array.from(cells);
      posCell[g] = cells.length ? cells[0] : -1;
    }
    const textPositions = [];
    for (let g = 0; g < nG; g++) {
      if (posImg[g] < 0) { posCell[g] = textPositions.length; textPositions.push(g); }
    }
    const msg = override ? 'This file\'s metadata gives the image grids; the override is ignored.' : '';
    return { p: 0, grouped: true, images, posImg, posCell, posCells, textPositions, totalCells: cellBase, msg };
  }

  mv.data = {
    fileSource, bufferSource, openDataset, buildDataset, metricColumn, loadInBackground, loadPromptTexts, buildLayout,
    hasMetric, isReady, ensure, segments, prefetch, pinSeries, fillSeries,
  };
})(window.maskvl = window.maskvl || {});

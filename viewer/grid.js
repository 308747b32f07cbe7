/*
 * maskvl viewer, grid and chip drawing: the views' DOM (one canvas per image,
 * one chip per text token), colour scales and colourbars, the tooltip, the
 * all-heads panel and the PNG export. A render touches only the rows of the
 * current key (~1-2k for usual files): image grids are drawn one pixel per
 * cell and scaled up; chips are reused and only changed where they differ.
 * In a group run (layout.grouped) a group's value fills all of its cells, each
 * group is outlined, and groups outside a single image are chips.
 */
(function (mv) {
  'use strict';

  const { $, el, fmt, visibleText, METRICS, LUT_IMAGE, LUT_TEXT, LUT_DIV } = mv.util;
  const app = mv.app;

  // ------------------------------------------------------------- view DOM

  function cellSize(im, nImages, compare) {
    const avail = Math.max(320, (document.documentElement.clientWidth - 48) / (compare ? 2 : 1));
    const maxW = Math.min(640, (avail - 16 * (nImages - 1)) / nImages);
    const aspect = im.resized ? (im.resized[1] / im.rows) / (im.resized[0] / im.cols) : 1; // cell h / w
    let w = Math.floor(Math.min(maxW / im.cols, 560 / (im.rows * aspect), 48));
    w = Math.max(w, 3);
    return [w, Math.max(2, Math.round(w * aspect))];
  }

  /** The drawn parts of an entry: a tiled image's grids (data.js tiledEntries), else the entry as one part. */
  function partsOf(im) {
    if (!im.parts) im.parts = [{ rows: im.rows, cols: im.cols, start: im.start, stride: im.cols, offset: 0, rect: [0, 0, 1, 1], grid: null, kind: im.kind || 'image' }];
    return im.parts;
  }

  /** Where a cell (a global index into the image values) is drawn: { im, part, k, r, c } or null. */
  function cellPlace(cell) {
    for (const im of app.layout.images) {
      const parts = partsOf(im);
      const n = parts.reduce((a, p) => a + p.rows * p.cols, 0);
      if (cell < im.cellBase || cell >= im.cellBase + n) continue;
      for (const part of parts) {
        const k = cell - im.cellBase - part.offset;
        if (k >= 0 && k < part.rows * part.cols) return { im, part, k, r: Math.floor(k / part.cols), c: k % part.cols };
      }
    }
    return null;
  }

  /** A grid's name for hover and status text: "image 0", "image 0 tile 2", "image 0 thumbnail". */
  function gridName(im, part) {
    if (!im.parts || part.grid === null) return `image ${im.index}`;
    return `image ${im.index} ${part.kind}` + (part.kind === 'tile' ? ` ${im.parts.indexOf(part)}` : '') + ` (grid ${part.grid})`;
  }

  /** A part's rect in canvas pixels. */
  function partRect(canvas, part) {
    const [x0, y0, x1, y1] = part.rect;
    return [x0 * canvas.width, y0 * canvas.height, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height];
  }

  /** Build the DOM of one view (image canvases + chips), reused across renders. */
  function buildView(container, which) {
    container.replaceChildren();
    const v = { which, container, title: el('div', { className: 'view-title' }), blocks: [], chips: [] };
    container.append(v.title);
    const imgWrap = el('div', { className: 'images' });
    app.layout.images.forEach((im, i) => {
      const [cw, ch] = cellSize(im, app.layout.images.length, app.state.compare !== 'off');
      const dpr = window.devicePixelRatio || 1;
      const canvas = el('canvas', { 'data-image': String(im.index) });
      canvas.width = Math.round(im.cols * cw * dpr);
      canvas.height = Math.round(im.rows * ch * dpr);
      canvas.style.width = im.cols * cw + 'px';
      canvas.style.height = im.rows * ch + 'px';
      const parts = partsOf(im).map((part) => {
        const small = document.createElement('canvas');
        small.width = part.cols; small.height = part.rows;
        const smallCtx = small.getContext('2d');
        return { part, small, smallCtx, img: smallCtx.createImageData(part.cols, part.rows) };
      });
      let what;
      if (im.spec !== undefined) what = `${im.rows}×${im.cols} groups ${im.spec} (${im.groups.length})`;
      else if (im.kind === 'mosaic') what = `${im.parts.length} tiles (${im.parts.map((p) => `${p.rows}×${p.cols}`).join(', ')}, ${im.count} tokens)`;
      else if (im.parts && im.parts[0].grid !== null) what = `${im.kind} ${im.rows}×${im.cols} grid (${im.count} tokens)`;
      else what = `${im.rows}×${im.cols} grid (${im.count} tokens)`;
      const caption = el('div', { className: 'caption', text: `Image ${im.index} · ${what}` + (im.path ? ' · ' + im.path.split(/[\\/]/).pop() : '') });
      const block = el('div', { className: 'image-block', 'data-image': String(im.index), 'data-kind': im.kind || 'image' }, caption, canvas);
      imgWrap.append(block);
      const b = { im, canvas, parts, ctx: canvas.getContext('2d'), cw, ch };
      v.blocks.push(b);
      canvas.addEventListener('mousemove', (e) => hoverCell(e, v, b));
      canvas.addEventListener('mouseleave', hideTip);
      canvas.addEventListener('click', (e) => { const q = cellAt(e, b); if (q >= 0) mv.chart.togglePin(q); });
      block.addEventListener('dragover', (e) => { e.preventDefault(); block.classList.add('drop-target'); });
      block.addEventListener('dragleave', () => block.classList.remove('drop-target'));
      block.addEventListener('drop', (e) => {
        e.preventDefault(); e.stopPropagation(); block.classList.remove('drop-target');
        const f = [...(e.dataTransfer.files || [])].find((x) => x.type.startsWith('image/'));
        if (f) mv.controls.loadImageFile(f, im.index);
        else if (e.dataTransfer.files.length) mv.controls.handleFiles(e.dataTransfer.files);
      });
    });
    v.imageStats = el('div', { className: 'stats' });
    const grouped = !!app.layout.grouped;
    if (app.layout.images.length) container.append(el('div', { className: 'view-section-title', text: grouped ? 'Groups in images' : 'Image tokens' }), imgWrap, v.imageStats);
    v.textStats = el('div', { className: 'stats' });
    const chipWrap = el('div', { className: 'chips' });
    const pr = app.ds.prompts[app.layout.p];
    app.layout.textPositions.forEach((q, i) => {
      const t = pr.texts[q];
      // (a group's label is a name, not a token: shown as it is)
      const chip = el('span', { className: 'chip', 'data-pos': String(q) }, el('span', { className: 't', text: grouped ? t : visibleText(t) }), el('span', { className: 'v', text: '' }));
      if (/^<\|.*\|>$|^<\/?s>$|^<.*>$/.test(t)) chip.classList.add('special');
      chipWrap.append(chip);
      v.chips.push({ node: chip, val: chip.lastChild, q, shown: true, bg: -1, nodata: false, pin: false });
    });
    chipWrap.addEventListener('mouseover', (e) => { const c = e.target.closest('.chip'); if (c) hoverChip(e, v, Number(c.dataset.pos)); });
    chipWrap.addEventListener('mousemove', (e) => { const c = e.target.closest('.chip'); if (c) moveTip(e); });
    chipWrap.addEventListener('mouseleave', hideTip);
    chipWrap.addEventListener('click', (e) => { const c = e.target.closest('.chip'); if (c) mv.chart.togglePin(Number(c.dataset.pos)); });
    const chipTitle = grouped ? 'Groups of text positions (or of several images)' : 'Text tokens';
    if (!grouped || app.layout.textPositions.length) container.append(el('div', { className: 'view-section-title', text: chipTitle }), chipWrap, v.textStats);
    v.imageVals = new Float32Array(app.layout.totalCells);
    v.textVals = new Float32Array(app.layout.textPositions.length);
    return v;
  }

  function rebuildViews() {
    app.views.a = buildView($('view-a'), 'a');
    $('view-b').hidden = app.state.compare === 'off';
    app.views.b = app.state.compare === 'off' ? null : buildView($('view-b'), 'b');
  }

  /** Fill a view's value buffers for (step, layer, variant) and metric; returns the row count. */
  function gather(v, s, l, vi, metric) {
    v.imageVals.fill(NaN);
    v.textVals.fill(NaN);
    const posImg = app.layout.posImg, posCell = app.layout.posCell, posCells = app.layout.posCells, nPos = posImg.length;
    let rows = 0;
    for (const { pos, col, perm, lo, hi } of mv.data.segments(app.ds, app.state.prompt, s, l, vi, metric)) {
      for (let j = lo; j < hi; j++) {
        const r = perm ? perm[j] : j;
        const q = pos[r];
        if (q >= nPos) continue;
        const c = posCell[q];
        if (c < 0) continue;
        if (posImg[q] < 0) v.textVals[c] = col[r];
        else if (posCells) { const x = col[r]; for (const cc of posCells[q]) v.imageVals[cc] = x; }
        else v.imageVals[c] = col[r];
      }
      rows += hi - lo;
    }
    return rows;
  }

  /**
   * Colour scale of one modality over one or more value buffers. Unsigned
   * metrics map lo..max to the colour map, with lo = 0 as a rule; when no
   * value is above 0 (a distance can dip below 0 only by rounding, as in
   * files computed in bfloat16) a 0..0 scale would draw nothing, so the scale
   * spans the values' own min..max (c..c+|c|, or 0..1, when every value is
   * c) and `degenerate` says why: 'nonpositive', or 'constant' when every
   * value is the same. Signed metrics map -max..max (-1..1 when all are 0).
   * `excluded` cells count in the mean but not in the range.
   */
  function makeScale(buffers, excluded, signed, scaling) {
    let max = -Infinity, min = Infinity, sum = 0, count = 0, used = 0;
    for (const buf of buffers) {
      for (let i = 0; i < buf.length; i++) {
        const x = buf[i];
        if (!Number.isFinite(x)) continue;
        sum += x; count++;
        if (excluded && excluded.has(i)) continue;
        used++;
        const a = signed ? Math.abs(x) : x;
        if (a > max) max = a;
        if (x < min) min = x;
      }
    }
    let lo = 0, hi = max, degenerate = null;
    if (!used) {
      hi = 1; // nothing to scale
    } else if (signed) {
      if (max === 0) { hi = 1; degenerate = 'constant'; }
    } else if (max <= 0) {
      lo = min;
      degenerate = min === max ? 'constant' : 'nonpositive';
      if (hi === lo) hi = lo + (Math.abs(lo) || 1);
    }
    let sorted = null;
    if (scaling === 'percentile') {
      const all = [];
      for (const buf of buffers) for (let i = 0; i < buf.length; i++) if (Number.isFinite(buf[i])) all.push(buf[i]);
      sorted = Float64Array.from(all).sort();
    }
    return {
      lo, max: hi, min: used ? min : NaN, valueMax: used ? (signed ? NaN : max) : NaN, degenerate,
      mean: count ? sum / count : NaN, count, signed, scaling, sorted,
    };
  }

  /** What a degenerate scale (see makeScale) means, in one sentence for the page; '' otherwise. */
  function scaleNote(what, sc) {
    if (!sc.degenerate) return '';
    const below = sc.min < 0 ? '; a distance below 0 is rounding error (e.g. a file computed in bfloat16)' : '';
    const range = sc.scaling === 'percentile' ? '' : ` The colour scale shows ${fmt(sc.lo)} to ${fmt(sc.max)}.`;
    if (sc.degenerate === 'constant') {
      return `Every ${what} value here is ${fmt(sc.min)}: masking a token changed nothing measurable at this layer${below}.${range}`;
    }
    return `Every ${what} value here is ≤ 0 (from ${fmt(sc.min)} to ${fmt(sc.valueMax)}): masking a token changed nothing ` +
      `measurable at this layer${below}.` +
      (range ? ` So the colours span these values' own range, ${fmt(sc.lo)} to ${fmt(sc.max)}, instead of 0 to max.` : '');
  }

  /** Map a value to a LUT index 0..255 under a scale. */
  function lutIndex(x, sc) {
    let t;
    if (sc.scaling === 'percentile') {
      const a = sc.sorted;
      let lo = 0, hi = a.length;
      while (lo < hi) { const m = (lo + hi) >> 1; if (a[m] < x) lo = m + 1; else hi = m; }
      t = a.length > 1 ? lo / (a.length - 1) : 1; // the rank spans the diverging map too
    } else if (sc.signed) {
      let u = Math.max(-1, Math.min(1, x / sc.max));
      if (sc.scaling === 'sqrt') u = Math.sign(u) * Math.sqrt(Math.abs(u));
      t = (u + 1) / 2;
    } else {
      const u = Math.max(0, Math.min(1, (x - sc.lo) / (sc.max - sc.lo)));
      t = sc.scaling === 'sqrt' ? Math.sqrt(u) : u;
    }
    return Math.max(0, Math.min(255, Math.round(t * 255)));
  }

  function drawImageBlock(v, b, sc, lut) {
    const { im, ctx, canvas } = b;
    const vals = v.imageVals;
    for (const { part, img, smallCtx } of b.parts) {
      const d = img.data;
      const base = im.cellBase + part.offset;
      for (let k = 0; k < part.rows * part.cols; k++) {
        const x = vals[base + k];
        const o = k * 4;
        if (Number.isFinite(x)) {
          const li = lutIndex(x, sc) * 3;
          d[o] = lut.rgb[li]; d[o + 1] = lut.rgb[li + 1]; d[o + 2] = lut.rgb[li + 2]; d[o + 3] = 255;
        } else {
          d[o] = 200; d[o + 1] = 200; d[o + 2] = 200; d[o + 3] = 90; // no value (padding cell or missing row)
        }
      }
      smallCtx.putImageData(img, 0, 0);
    }
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const photo = app.imagesLoaded[im.index];
    if (photo) {
      // A single grid covers the resized image exactly, so the image is stretched to the grid's extent;
      // a tiled image's entry places the picture in its extent (tiles may reach into the padding).
      const [x0, y0, x1, y1] = im.photo || [0, 0, 1, 1];
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(photo, x0 * canvas.width, y0 * canvas.height, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height);
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = app.state.opacity;
    }
    for (const { part, small } of b.parts) ctx.drawImage(small, ...partRect(canvas, part));
    ctx.globalAlpha = 1;
    if (im.kind === 'mosaic') {
      // each tile's outline, so that the mosaic's seams show
      ctx.lineWidth = 1;
      ctx.strokeStyle = 'rgba(255,255,255,0.9)';
      for (const { part } of b.parts) { const [x, y, w, h] = partRect(canvas, part); ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1); }
    }
    if (app.layout.grouped) { drawGroupOutlines(b); return; }
    if (app.state.pinned >= 0 && app.layout.posImg[app.state.pinned] === im.entry) {
      const at = cellPlace(app.layout.posCell[app.state.pinned]);
      if (!at) return;
      const [px, py, pw, ph] = partRect(canvas, at.part);
      const sx = pw / at.part.cols, sy = ph / at.part.rows;
      const x = px + at.c * sx, y = py + at.r * sy;
      ctx.lineWidth = Math.max(2, sx / 8);
      ctx.strokeStyle = '#000';
      ctx.strokeRect(x + 1, y + 1, sx - 2, sy - 2);
      ctx.strokeStyle = '#fff';
      ctx.lineWidth = 1;
      ctx.strokeRect(x + 2.5, y + 2.5, sx - 5, sy - 5);
    }
  }

  /** The canvas rectangles [x, y, w, h] of a group's cells in an entry: per part, its cells' bounding box. */
  function groupRects(im, canvas, g) {
    const boxes = new Map();
    for (const cell of app.layout.posCells[g]) {
      const at = cellPlace(cell);
      if (!at || at.im !== im) continue;
      const b = boxes.get(at.part) || [Infinity, Infinity, -1, -1];
      boxes.set(at.part, [Math.min(b[0], at.r), Math.min(b[1], at.c), Math.max(b[2], at.r + 1), Math.max(b[3], at.c + 1)]);
    }
    return [...boxes].map(([part, [r0, c0, r1, c1]]) => {
      const [px, py, pw, ph] = partRect(canvas, part);
      const sx = pw / part.cols, sy = ph / part.rows;
      return [px + c0 * sx, py + r0 * sy, (c1 - c0) * sx, (r1 - r0) * sy, sx];
    });
  }

  /** A thin outline around each group of a group-run grid (so equal neighbours stay apart), the pinned one bold. */
  function drawGroupOutlines(b) {
    const { im, ctx, canvas } = b;
    ctx.lineWidth = 1;
    ctx.strokeStyle = 'rgba(255,255,255,0.8)';
    for (const g of im.groups) {
      for (const [x, y, w, h] of groupRects(im, canvas, g)) ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
    }
    const q = app.state.pinned;
    if (q >= 0 && im.groups.includes(q)) {
      ctx.strokeStyle = '#000';
      for (const [x, y, w, h, sx] of groupRects(im, canvas, q)) {
        ctx.lineWidth = Math.max(2, sx / 8);
        ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
      }
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
      const pin = c.q === app.state.pinned;
      if (pin !== c.pin) { c.node.classList.toggle('pinned', pin); c.pin = pin; }
    }
  }

  function excludedCells() {
    // (a group run has no single first token to leave out)
    if (!app.state.excludeFirst || !app.layout.images.length || app.layout.grouped) return null;
    return new Set(app.layout.images.map((im) => im.cellBase));
  }

  function currentMetricInfo() { return METRICS[app.state.metric]; }

  function viewParams(which) {
    if (which === 'a') return { s: app.state.step, l: app.state.layer };
    if (app.state.compare === 'layer') return { s: app.state.step, l: app.state.compareWith };
    return { s: app.state.compareWith, l: app.state.layer };
  }

  function viewTitle(which) {
    const { s, l } = viewParams(which);
    return `Layer ${app.ds.layers[l]} · step ${app.ds.steps[s]}`;
  }

  function statsLine(kind, sc, v) {
    if (kind === 'image') {
      const grids = app.layout.images.map((im) => (im.kind === 'mosaic' ? `${im.parts.length} tiles` : `${im.rows}×${im.cols}`)).join(' + ');
      let arg = -1, best = -Infinity;
      for (let i = 0; i < v.imageVals.length; i++) { const x = v.imageVals[i]; if (x > best) { best = x; arg = i; } }
      let where = '';
      if (arg >= 0) {
        const at = cellPlace(arg);
        const im = at.im, k = arg - im.cellBase;
        where = im.cellGroup ? ` at ${JSON.stringify(app.ds.prompts[0].texts[im.cellGroup[k]])} (group ${im.cellGroup[k]})`
          : ` at ${gridName(im, at.part)} r${at.r} c${at.c}`;
      }
      return `image: max ${fmt(best === -Infinity ? NaN : best)}${where} · mean ${fmt(sc.mean)} · count ${sc.count} · grid ${grids}` +
        (excludedCells() ? ' · scale excludes first image token' : '') +
        (sc.lo ? ` · scale ${fmt(sc.lo)} to ${fmt(sc.max)}` : ` · scale max ${fmt(sc.max)}`);
    }
    let arg = -1, best = -Infinity;
    for (let i = 0; i < v.textVals.length; i++) { const x = v.textVals[i]; if (x > best) { best = x; arg = i; } }
    const unit = app.layout.grouped ? 'group' : 'pos';
    const top = arg >= 0 ? ` at ${JSON.stringify(app.ds.prompts[app.state.prompt].texts[app.layout.textPositions[arg]])} (${unit} ${app.layout.textPositions[arg]})` : '';
    return `text: max ${fmt(best === -Infinity ? NaN : best)}${top} · mean ${fmt(sc.mean)} · count ${sc.count}`;
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
    return fmt(sc.lo + (sc.scaling === 'sqrt' ? t * t : t) * (sc.max - sc.lo));
  }

  /** The position (or group) under the pointer, or -1. */
  function cellAt(e, b) {
    const rect = b.canvas.getBoundingClientRect();
    const fx = (e.clientX - rect.left) / rect.width, fy = (e.clientY - rect.top) / rect.height;
    if (b.im.parts && b.im.parts[0].grid !== null) {
      for (const part of b.im.parts) {
        const [x0, y0, x1, y1] = part.rect;
        if (fx < x0 || fy < y0 || fx >= x1 || fy >= y1) continue;
        const c = Math.floor(((fx - x0) / (x1 - x0)) * part.cols), r = Math.floor(((fy - y0) / (y1 - y0)) * part.rows);
        return b.im.cellGroup ? b.im.cellGroup[part.offset + r * part.cols + c] : part.start + r * part.stride + c;
      }
      return -1;
    }
    const c = Math.floor(fx * b.im.cols);
    const r = Math.floor(fy * b.im.rows);
    if (c < 0 || r < 0 || c >= b.im.cols || r >= b.im.rows) return -1;
    const k = r * b.im.cols + c;
    if (k >= b.im.count) return -1;
    return b.im.cellGroup ? b.im.cellGroup[k] : b.im.start + k;
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
    if (b.im.cellGroup) {
      const x = v.imageVals[app.layout.posCell[q]];
      showTip(e, `${app.ds.prompts[0].texts[q]}  group ${q} (${b.im.spec})\nimage ${b.im.index} · ${app.layout.posCells[q].length} tokens\n${currentMetricInfo().label}: ${fmt(x)}`);
      return;
    }
    const at = cellPlace(app.layout.posCell[q]);
    if (!at) { hideTip(); return; }
    const x = v.imageVals[app.layout.posCell[q]];
    showTip(e, `${visibleText(app.ds.prompts[app.state.prompt].texts[q])}  pos ${q}\n${gridName(at.im, at.part)} · row ${at.r} col ${at.c}\n${currentMetricInfo().label}: ${fmt(x)}`);
  }

  function hoverChip(e, v, q) {
    const i = app.layout.posCell[q];
    showTip(e, `${JSON.stringify(app.ds.prompts[app.state.prompt].texts[q])}  ${app.layout.grouped ? 'group' : 'pos'} ${q}\n${currentMetricInfo().label}: ${fmt(v.textVals[i])}`);
  }

  // --------------------------------------------------------- heads panel

  function drawHeads(metric) {
    const panel = $('heads-panel');
    panel.hidden = false;
    const heads = [];
    app.ds.variants.forEach((name, i) => { if (/^Head_\d+$/.test(name)) heads.push(i); });
    const grid = $('heads-grid');
    if (!heads.length) {
      $('heads-title').textContent = 'This file has no per-head variants.';
      grid.replaceChildren();
      return;
    }
    const s = app.state.step, l = app.state.layer;
    const tmp = { imageVals: new Float32Array(app.layout.totalCells), textVals: new Float32Array(app.layout.textPositions.length) };
    const vals = heads.map((vi) => { gather(tmp, s, l, vi, metric); return { img: tmp.imageVals.slice(), txt: tmp.textVals.slice() }; });
    const signed = currentMetricInfo().signed;
    const scI = makeScale(vals.map((x) => x.img), excludedCells(), signed, app.state.scaling === 'percentile' ? 'linear' : app.state.scaling);
    const scT = makeScale(vals.map((x) => x.txt), null, signed, app.state.scaling === 'percentile' ? 'linear' : app.state.scaling);
    $('heads-title').textContent = `All ${heads.length} heads at layer ${app.ds.layers[l]}, step ${app.ds.steps[s]} (${currentMetricInfo().label}; shared scales: image max ${fmt(scI.max)}, text max ${fmt(scT.max)}; click a head to select it)`;
    const lutI = signed ? LUT_DIV : LUT_IMAGE, lutT = signed ? LUT_DIV : LUT_TEXT;
    const nT = app.layout.textPositions.length;
    const wImg = app.layout.images.reduce((a, im) => a + im.cols, 0) + Math.max(0, app.layout.images.length - 1);
    const hImg = app.layout.images.reduce((a, im) => Math.max(a, im.rows), 0);
    const W = Math.max(wImg, Math.min(nT, 48), 8);
    const textRows = Math.ceil(nT / W);
    const H = hImg + (hImg ? 1 : 0) + textRows;
    const scale = Math.max(2, Math.min(6, Math.floor(128 / W)));
    if (grid.childElementCount !== heads.length) {
      grid.replaceChildren(...heads.map((vi) => {
        const c = el('canvas');
        const tile = el('div', { className: 'head-tile', 'data-variant': String(vi) }, c, el('span', { text: app.ds.variants[vi] }));
        tile.addEventListener('click', () => { app.state.variant = vi; mv.controls.clampState(); mv.app.render(); });
        return tile;
      }));
    }
    heads.forEach((vi, h) => {
      const tile = grid.children[h];
      tile.classList.toggle('current', vi === app.state.variant);
      const c = tile.firstChild;
      if (c.width !== W || c.height !== H) { c.width = W; c.height = H; c.style.width = W * scale + 'px'; c.style.height = H * scale + 'px'; }
      const ctx = c.getContext('2d');
      const img = ctx.createImageData(W, H);
      const d = img.data;
      const put = (x, y, li, lut) => { const o = (y * W + x) * 4; d[o] = lut.rgb[li * 3]; d[o + 1] = lut.rgb[li * 3 + 1]; d[o + 2] = lut.rgb[li * 3 + 2]; d[o + 3] = 255; };
      let x0 = 0;
      for (const im of app.layout.images) {
        // each part's cells at its place in the entry's rows × cols raster (a tile mosaic assembled)
        for (const part of partsOf(im)) {
          const rx = part.rect[0] * im.cols, ry = part.rect[1] * im.rows;
          const sx = ((part.rect[2] - part.rect[0]) * im.cols) / part.cols, sy = ((part.rect[3] - part.rect[1]) * im.rows) / part.rows;
          for (let k = 0; k < part.rows * part.cols; k++) {
            const x = vals[h].img[im.cellBase + part.offset + k];
            const px = Math.min(im.cols - 1, Math.floor(rx + (k % part.cols) * sx)), py = Math.min(im.rows - 1, Math.floor(ry + Math.floor(k / part.cols) * sy));
            if (Number.isFinite(x)) put(x0 + px, py, lutIndex(x, scI), lutI);
          }
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
    const base = (app.ds.fileName || 'maskvl').replace(/\.parquet$/i, '').replace(/[^\w.-]+/g, '_');
    return `${base}_L${app.ds.layers[app.state.layer]}_S${app.ds.steps[app.state.step]}_${app.ds.variants[app.state.variant]}_${METRICS[app.state.metric].short}.png`;
  }

  /** Render the current view (grids, colourbars, text tokens) into a PNG data URL. */
  function exportPNG() {
    const pad = 16;
    const active = [app.views.a].concat(app.views.b ? [app.views.b] : []);
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
        const label = visibleText(app.ds.prompts[app.state.prompt].texts[c.q]);
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
    mv.app.statusText().split('\n').forEach((line, i) => ctx.fillText(line.length > 140 ? line.slice(0, 140) + '…' : line, pad, pad + i * 16));
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

  mv.grid = {
    rebuildViews, gather, makeScale, scaleNote, lutIndex, drawImageBlock, drawChips, excludedCells, currentMetricInfo,
    viewParams, viewTitle, statsLine, drawColourbar, hideTip, moveTip, drawHeads, exportName, exportPNG, cellPlace, gridName,
  };
})(window.maskvl = window.maskvl || {});

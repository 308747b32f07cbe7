/*
 * maskvl viewer, controls: the form controls and their sync with the state,
 * keyboard shortcuts, the file input, drag and drop, overlay images and the
 * error box.
 */
(function (mv) {
  'use strict';

  const { $, el, METRICS, debounce } = mv.util;
  const app = mv.app;

  // ------------------------------------------------------------- controls

  function fillSelect(sel, labels) {
    sel.replaceChildren(...labels.map((t, i) => el('option', { value: String(i), text: t })));
  }

  function availableMetrics() {
    const list = ['l2_distance', 'cosine_distance'];
    if (app.ds.variants[app.state.variant] === 'Logits') for (const m of app.ds.optional) list.push(m);
    return list;
  }

  function setupControls() {
    $('prompt-wrap').hidden = app.ds.P < 2;
    fillSelect($('prompt-select'), app.ds.prompts.map((p, i) => (p.name !== null ? p.name : `prompt ${i}`)));
    fillSelect($('step-select'), app.ds.steps.map(String));
    fillSelect($('variant-select'), app.ds.variants);
    const r = $('layer-range');
    r.min = '0'; r.max = String(app.ds.L - 1);
  }

  let lastMetricList = '';
  /** Set a control's property only when it differs (each write invalidates style). */
  function setProp(id, prop, value) { const n = $(id); if (n[prop] !== value) n[prop] = value; }

  function syncControls() {
    setProp('prompt-select', 'value', String(app.state.prompt));
    setProp('layer-range', 'value', String(app.state.layer));
    setProp('layer-label', 'textContent', `${app.ds.layers[app.state.layer]} (${app.state.layer + 1}/${app.ds.L})`);
    setProp('step-select', 'value', String(app.state.step));
    setProp('variant-select', 'value', String(app.state.variant));
    const ms = availableMetrics();
    const sig = ms.join(',');
    if (sig !== lastMetricList) { fillSelectValues($('metric-select'), ms, ms.map((m) => METRICS[m].label)); lastMetricList = sig; }
    setProp('metric-select', 'value', app.state.metric);
    setProp('scaling-select', 'value', app.state.scaling);
    setProp('exclude-first', 'checked', app.state.excludeFirst);
    setProp('compare-select', 'value', app.state.compare);
    setProp('heads-toggle', 'checked', app.state.heads);
    const cw = $('compare-with');
    cw.hidden = app.state.compare === 'off';
    if (app.state.compare !== 'off') {
      const labels = app.state.compare === 'layer' ? app.ds.layers.map((x) => 'layer ' + x) : app.ds.steps.map((x) => 'step ' + x);
      if (cw.dataset.kind !== app.state.compare || cw.options.length !== labels.length) { fillSelect(cw, labels); cw.dataset.kind = app.state.compare; }
      cw.value = String(app.state.compareWith);
    }
  }

  function fillSelectValues(sel, values, labels) {
    sel.replaceChildren(...values.map((v, i) => el('option', { value: v, text: labels[i] })));
  }

  function clampState() {
    app.state.prompt = Math.max(0, Math.min(app.ds.P - 1, app.state.prompt | 0));
    app.state.step = Math.max(0, Math.min(app.ds.S - 1, app.state.step | 0));
    app.state.layer = Math.max(0, Math.min(app.ds.L - 1, app.state.layer | 0));
    app.state.variant = Math.max(0, Math.min(app.ds.V - 1, app.state.variant | 0));
    if (!availableMetrics().includes(app.state.metric)) app.state.metric = 'l2_distance';
    const lim = app.state.compare === 'layer' ? app.ds.L : app.ds.S;
    app.state.compareWith = Math.max(0, Math.min(lim - 1, app.state.compareWith | 0));
  }

  function setCompare(mode) {
    app.state.compare = mode;
    if (mode === 'layer') app.state.compareWith = Math.min(app.ds.L - 1, app.state.layer + 1);
    if (mode === 'step') app.state.compareWith = Math.min(app.ds.S - 1, app.state.step + 1);
    mv.grid.rebuildViews();
  }

  function setPrompt(p) {
    app.state.prompt = p;
    app.state.pinned = -1;
    app.layout = mv.data.buildLayout(app.ds, p, app.state.override);
    $('grid-msg').textContent = app.layout.msg;
    mv.grid.rebuildViews();
  }

  function bindControls() {
    const blurAfter = (node) => node.addEventListener('change', () => node.blur());
    $('prompt-select').addEventListener('change', (e) => { setPrompt(Number(e.target.value)); mv.app.render(); });
    $('layer-range').addEventListener('input', (e) => { app.state.layer = Number(e.target.value); mv.app.render(); });
    $('step-select').addEventListener('change', (e) => { app.state.step = Number(e.target.value); mv.app.render(); });
    $('variant-select').addEventListener('change', (e) => { app.state.variant = Number(e.target.value); clampState(); mv.app.render(); });
    $('metric-select').addEventListener('change', (e) => { app.state.metric = e.target.value; mv.app.render(); });
    $('scaling-select').addEventListener('change', (e) => { app.state.scaling = e.target.value; mv.app.render(); });
    $('exclude-first').addEventListener('change', (e) => { app.state.excludeFirst = e.target.checked; mv.app.render(); });
    $('opacity').addEventListener('input', (e) => { setOpacity(Number(e.target.value) / 100); mv.app.render(); });
    $('compare-select').addEventListener('change', (e) => { setCompare(e.target.value); mv.app.render(); });
    $('compare-with').addEventListener('change', (e) => { app.state.compareWith = Number(e.target.value); mv.app.render(); });
    $('heads-toggle').addEventListener('change', (e) => { app.state.heads = e.target.checked; mv.app.render(); });
    $('grid-override').addEventListener('change', (e) => {
      const m = /^\s*(\d+)\s*[x×*,]\s*(\d+)\s*$/i.exec(e.target.value);
      app.state.override = m ? [Number(m[1]), Number(m[2])] : null;
      if (e.target.value.trim() && !m) { $('grid-msg').textContent = 'Grid override must look like 16×16 or 16x16.'; return; }
      if (app.state.override && (app.state.override[0] < 1 || app.state.override[1] < 1)) app.state.override = null;
      setPrompt(app.state.prompt);
      mv.app.render();
    });
    $('export-png').addEventListener('click', () => {
      const url = mv.grid.exportPNG();
      const a = el('a', { href: url, download: mv.grid.exportName() });
      document.body.append(a); a.click(); a.remove();
    });
    $('image-input').addEventListener('change', (e) => { for (const f of e.target.files) loadImageFile(f, null); e.target.value = ''; });
    for (const id of ['prompt-select', 'step-select', 'variant-select', 'metric-select', 'scaling-select', 'compare-select', 'compare-with']) blurAfter($(id));
    window.addEventListener('resize', debounce(() => { if (app.ds) { mv.grid.rebuildViews(); mv.app.render(); } }, 150));
  }

  function setOpacity(x) {
    app.state.opacity = Math.max(0, Math.min(1, x));
    $('opacity').value = String(Math.round(app.state.opacity * 100));
    $('opacity-label').textContent = Math.round(app.state.opacity * 100) + '%';
  }

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
    if (!app.ds || e.ctrlKey || e.metaKey || e.altKey || isTyping(e.target)) return;
    const t0 = performance.now();
    let handled = true;
    switch (e.key) {
      case 'ArrowLeft': app.state.layer = Math.max(0, app.state.layer - 1); break;
      case 'ArrowRight': app.state.layer = Math.min(app.ds.L - 1, app.state.layer + 1); break;
      case 'ArrowUp': app.state.step = Math.max(0, app.state.step - 1); break;
      case 'ArrowDown': app.state.step = Math.min(app.ds.S - 1, app.state.step + 1); break;
      case 'm': case 'M': {
        const ms = availableMetrics();
        app.state.metric = ms[(ms.indexOf(app.state.metric) + 1) % ms.length];
        break;
      }
      case 's': case 'S': {
        const sc = ['linear', 'sqrt', 'percentile'];
        app.state.scaling = sc[(sc.indexOf(app.state.scaling) + 1) % sc.length];
        break;
      }
      case 'v': case ']': app.state.variant = (app.state.variant + 1) % app.ds.V; clampState(); break;
      case 'V': case '[': app.state.variant = (app.state.variant - 1 + app.ds.V) % app.ds.V; clampState(); break;
      case 'h': case 'H': app.state.heads = !app.state.heads; break;
      case 'p': case 'P':
        if (app.ds.P < 2) { handled = false; break; }
        setPrompt((app.state.prompt + 1) % app.ds.P); break;
      case 'Escape': if (app.state.pinned < 0) handled = false; app.state.pinned = -1; break;
      default: handled = false;
    }
    if (!handled) return;
    e.preventDefault(); // arrows must not scroll the page
    mv.app.render();
    app.perf.lastKeyMs = performance.now() - t0;
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
        const ims = app.layout ? app.layout.images : [];
        const base = (name || '').split(/[\\/]/).pop();
        // slots are images (a group run may draw one image in several grids)
        const byName = ims.find((im) => im.path && im.path.split(/[\\/]/).pop() === base);
        const free = ims.find((im) => !app.imagesLoaded[im.index]);
        i = byName ? byName.index : free ? free.index : 0;
      }
      app.imagesLoaded[i] = img;
      if (app.ds) mv.app.render();
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
    if (pq) await mv.app.loadFile(pq);
    for (const f of imgs) loadImageFile(f, null);
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

  mv.controls = {
    setupControls, syncControls, availableMetrics, clampState, setPrompt, bindControls, onKey,
    loadImageFile, loadImageUrl, showError, clearError, handleFiles, setupDrop,
  };
})(window.maskvl = window.maskvl || {});

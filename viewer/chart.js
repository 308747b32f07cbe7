/*
 * maskvl viewer, chart: the pinned token's value across layers, one line per
 * generation step (legend: a coloured swatch per step); a click on the chart
 * jumps to that layer.
 */
(function (mv) {
  'use strict';

  const { $, el, fmt } = mv.util;
  const app = mv.app;

  // ------------------------------------------------------------- pin chart

  function togglePin(q) {
    app.state.pinned = app.state.pinned === q ? -1 : q;
    mv.app.render();
  }

  const STEP_COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22'];

  /**
   * Draw the pinned token's chart for `metric`. A file read whole has every
   * value at hand; a lazily read one gives what its cache holds, and the rest
   * is read in the background (one row group at a time), redrawing as it
   * comes in.
   */
  function drawPinChart(metric) {
    const q = app.state.pinned;
    const panel = $('pin-panel');
    panel.hidden = false;
    const ds = app.ds;
    const ser = mv.data.pinSeries(ds, app.state.prompt, app.state.variant, metric);
    const series = [];
    let max = 0, min = 0;
    for (let s = 0; s < ds.S; s++) {
      const ys = new Float64Array(ds.L);
      for (let l = 0; l < ds.L; l++) {
        const y = q < ser.nPos ? ser.vals[(s * ds.L + l) * ser.nPos + q] : NaN;
        ys[l] = y;
        if (y > max) max = y;
        if (y < min) min = y;
      }
      series.push(ys);
    }
    if (ser.remaining && !ser.filling) {
      const same = () => app.ds === ds && app.state.pinned >= 0 && ds.series.get(ser.id) === ser;
      let last = 0;
      const redraw = () => {
        // at most ~8 redraws a second while the groups come in, and one at the end
        const now = performance.now();
        if (same() && (now - last > 120 || !ser.remaining)) { last = now; drawPinChart(metric); }
      };
      mv.data.fillSeries(ds, ser, same, redraw).then(() => { if (same()) drawPinChart(metric); },
        (e) => mv.controls.showError(e.message));
    }
    const progress = ser.remaining ? ` · reading the file (${ds.S * ds.L - ser.remaining} of ${ds.S * ds.L} step×layer pairs so far)` : '';
    const pr = app.ds.prompts[app.state.prompt];
    let where = '';
    if (app.layout.grouped) {
      where = app.layout.posImg[q] >= 0 ? ` · image ${app.layout.images[app.layout.posImg[q]].index}` : '';
    } else if (app.layout.posImg[q] >= 0) {
      const at = mv.grid.cellPlace(app.layout.posCell[q]);
      where = at ? ` · ${mv.grid.gridName(at.im, at.part)} row ${at.r} col ${at.c}` : '';
    }
    const what = app.layout.grouped ? `group ${q}` : `position ${q}`;
    $('pin-title').textContent = `Pinned: ${JSON.stringify(pr.texts[q])} at ${what}${where} · ${mv.grid.currentMetricInfo().label} · ${app.ds.variants[app.state.variant]} across layers (one line per step; Esc to unpin)${progress}`;
    const cv = $('pin-chart');
    const ctx = cv.getContext('2d');
    const W = cv.width, H = cv.height, m = { l: 56, r: 10, t: 10, b: 26 };
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, H);
    if (max === min) max = min + 1;
    const X = (l) => m.l + (app.ds.L > 1 ? (l / (app.ds.L - 1)) * (W - m.l - m.r) : 0);
    const Y = (y) => H - m.b - ((y - min) / (max - min)) * (H - m.t - m.b);
    ctx.strokeStyle = '#999'; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(m.l, m.t); ctx.lineTo(m.l, H - m.b); ctx.lineTo(W - m.r, H - m.b); ctx.stroke();
    ctx.fillStyle = '#333'; ctx.font = '11px sans-serif'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    for (const y of [min, (min + max) / 2, max]) ctx.fillText(fmt(y), m.l - 4, Y(y));
    ctx.textAlign = 'center'; ctx.textBaseline = 'top';
    const every = Math.max(1, Math.ceil(app.ds.L / 12));
    for (let l = 0; l < app.ds.L; l += every) ctx.fillText(String(app.ds.layers[l]), X(l), H - m.b + 4);
    ctx.strokeStyle = '#bbb'; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(X(app.state.layer), m.t); ctx.lineTo(X(app.state.layer), H - m.b); ctx.stroke();
    ctx.setLineDash([]);
    series.forEach((ys, s) => {
      ctx.strokeStyle = STEP_COLOURS[s % STEP_COLOURS.length];
      ctx.lineWidth = s === app.state.step ? 2.5 : 1.5;
      ctx.beginPath();
      let pen = false;
      for (let l = 0; l < app.ds.L; l++) {
        if (!Number.isFinite(ys[l])) { pen = false; continue; }
        if (pen) ctx.lineTo(X(l), Y(ys[l])); else ctx.moveTo(X(l), Y(ys[l]));
        pen = true;
      }
      ctx.stroke();
    });
    drawLegend(series.length);
    cv.onclick = (e) => {
      const rect = cv.getBoundingClientRect();
      const x = ((e.clientX - rect.left) / rect.width) * W;
      app.state.layer = Math.max(0, Math.min(app.ds.L - 1, Math.round(((x - m.l) / (W - m.l - m.r)) * (app.ds.L - 1))));
      mv.app.render();
    };
  }

  /** One coloured swatch and label per step line; the current step's is bold. */
  function drawLegend(nSteps) {
    const items = [];
    for (let s = 0; s < nSteps; s++) {
      const swatch = el('span', { className: 'swatch', 'aria-hidden': 'true' });
      swatch.style.backgroundColor = STEP_COLOURS[s % STEP_COLOURS.length];
      const item = el('span', { className: 'legend-item' + (s === app.state.step ? ' current' : ''), 'data-step': String(s) },
        swatch, `step ${app.ds.steps[s]}`);
      items.push(item);
    }
    items.push(el('span', { className: 'muted', text: 'click the chart to jump to a layer' }));
    $('pin-legend').replaceChildren(...items);
  }

  mv.chart = { togglePin, drawPinChart };
})(window.maskvl = window.maskvl || {});

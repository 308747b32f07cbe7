"""Browser tests of the static viewer (viewer/) and of maskvl.view.write_page.

Real headless Chromium (Debian's /usr/bin/chromium, driven by Python playwright
with executable_path; never a browser download), all network blocked.
Browser tests are skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from maskvl.view import ViewError, write_page
try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest's prepend mode)
    from tests.viewer_support import (  # noqa: F401  (browser, viewer: fixtures)
        KEY_LOOP_JS, PROTOTYPE_DIR, REPO, VIEWER_INDEX, Viewer, browser, make_maskvl_file, make_prototype_file,
        natural_variants, needs_chromium, press_all, set_view, viewer,
    )
except ImportError:
    from viewer_support import (  # type: ignore[no-redef]  # noqa: F401
        KEY_LOOP_JS, PROTOTYPE_DIR, REPO, VIEWER_INDEX, Viewer, browser, make_maskvl_file, make_prototype_file,
        natural_variants, needs_chromium, press_all, set_view, viewer,
    )
BIG_PROTOTYPE = PROTOTYPE_DIR / "animal_count_question.parquet"
SMALL_PROTOTYPE = PROTOTYPE_DIR / "image_question_hair.parquet"
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "<script>alert(1)</script>"

# LUT end colours from viewer/util.js (image map: white -> ... -> dark red).
IMAGE_TOP = (110, 0, 20)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """maskvl file with two non-square images (7x10 and 5x3) and readable image files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("two")
    # image 0: left half red, right half blue, with an aspect ratio unlike the grid's
    im0 = Image.new("RGB", (300, 203), (255, 0, 0))
    im0.paste((0, 0, 255), (150, 0, 300, 203))
    im0.save(d / "left_red_right_blue.png")
    Image.new("RGB", (90, 145), (0, 200, 0)).save(d / "green.png")
    paths = [str(d / "left_red_right_blue.png"), str(d / "green.png")]
    return make_maskvl_file(d / "two_images.parquet", grids=((7, 10), (5, 3)), num_layers=4, num_heads=12,
                            num_steps=2, logits=True, compression="zstd", image_paths=paths)


# --------------------------------------------------------- prototype files

@needs_chromium
@pytest.mark.parametrize("path, rows, cols, n_rows", [
    (SMALL_PROTOTYPE, 16, 16, 696456),
    (BIG_PROTOTYPE, 32, 32, 2576520),
])
def test_prototype_file_opens_fast(viewer, path, rows, cols, n_rows):
    if not path.exists():
        pytest.skip(f"prototype file {path} not present")
    v = viewer().goto()
    load = v.open(path)
    # the other metric columns are read after the first render; time keys after that
    v.page.wait_for_function("window.maskvlViewer.perf.backgroundDone", timeout=30000)
    assert load["rows"] == n_rows
    # the 2.58M-row file opens in under 2 s (read + index + first render)
    assert load["totalMs"] < 2000, load
    vals = v.values()
    assert [(im["rows"], im["cols"]) for im in vals["images"]] == [(rows, cols)]
    # every grid cell of the first view has a value; the image is one run of pads
    assert sum(x is not None for x in vals["image"]) == rows * cols
    assert len(vals["textPositions"]) > 10
    chips = v.page.eval_on_selector_all("#view-a .chip:not([hidden]) .t", "ns => ns.map(n => n.textContent)")
    assert "<|vision_start|>" in chips and "<|vision_end|>" in chips  # specials stay out of the grid
    assert "↵" in chips  # newlines are visible
    status = v.status()
    assert "Layer 0 (1 of 36)" in status and "step 0 (1 of 2)" in status and "generates" in status
    assert "variant Full (1 of 34)" in status
    # variants in natural order (Head_2 before Head_10)
    opts = v.page.eval_on_selector_all("#variant-select option", "ns => ns.map(n => n.textContent)")
    assert opts == natural_variants(32, False)
    # key presses re-render in under 30 ms each (in-page timing of handler + render)
    times = press_all(v, ["ArrowRight"] * 5 + ["ArrowDown", "m", "s", "s", "v", "V", "ArrowLeft", "ArrowUp", "s", "m"])
    assert max(times) < 30, times
    # and including style/layout, over a longer run. On this 2-core box a GC
    # pause or the test process itself can stall one frame, so the bound is
    # on the 95th percentile there (the handler bound above is on every key).
    loop = sorted(v.page.evaluate(KEY_LOOP_JS, 60))
    assert loop[len(loop) * 95 // 100] < 30 and loop[len(loop) // 2] < 15, loop[-5:]


# ------------------------------------------------------ two non-square images

@needs_chromium
def test_two_non_square_images(viewer, two_images):
    v = viewer().goto()
    v.open(two_images.path)
    vals = v.values()
    assert [(im["rows"], im["cols"]) for im in vals["images"]] == [(7, 10), (5, 3)]
    canvases = v.page.query_selector_all("#view-a .image-block canvas")
    assert len(canvases) == 2
    for c, (r, cc) in zip(canvases, [(7, 10), (5, 3)]):
        box = c.bounding_box()
        # cells are square (resized_size is 32 px per cell both ways)
        assert abs(box["width"] / box["height"] - cc / r) < 0.05, box
    # the values in the view are the file's values, cell by cell, for several keys
    for step, layer, variant, metric in [(0, 0, "Full", "l2_distance"), (1, 3, "Head_10", "cosine_distance"),
                                         (1, 2, "Logits", "kl_divergence"), (0, 1, "Logits", "target_prob_delta")]:
        v.page.evaluate(
            """([s, l, vn, m]) => { const st = window.maskvlViewer.state, ds = window.maskvlViewer.dataset;
                 st.step = s; st.layer = l; st.variant = ds.variants.indexOf(vn); st.metric = m; window.maskvlViewer.render(); }""",
            [step, layer, variant, metric])
        assert v.state()["metric"] == metric
        got = v.values()
        want = two_images.values(step, layer, variant, metric)
        for im in got["images"]:
            cells = np.array(got["image"][im["cellBase"]:im["cellBase"] + im["count"]], dtype=float)
            np.testing.assert_allclose(cells, want[im["start"]:im["start"] + im["count"]], rtol=1e-6)
        text = np.array([np.nan if x is None else x for x in got["text"]])
        seq = two_images.prompt_len + step
        tp = np.array(got["textPositions"])
        np.testing.assert_allclose(text[tp < seq], want[tp[tp < seq]], rtol=1e-6)
    # the hottest image cell (first tokens excluded from the max) has the top colour
    v.page.evaluate("""() => { const st = window.maskvlViewer.state; st.step = 0; st.layer = 0; st.variant = 0;
                        st.metric = 'l2_distance'; window.maskvlViewer.render(); }""")
    want = two_images.values(0, 0, "Full", "l2_distance")
    imgs = two_images.meta["images"]
    best, where = -1.0, None
    for i, im in enumerate(imgs):
        for k in range(1, im["grid_rows"] * im["grid_cols"]):
            x = want[im["token_start"] + k]
            if x > best:
                best, where = x, (i, k // im["grid_cols"], k % im["grid_cols"])
    i, r, c = where
    im = imgs[i]
    rgb = v.pixel(f"#view-a canvas[data-image='{i}']", (c + 0.5) / im["grid_cols"], (r + 0.5) / im["grid_rows"])
    assert max(abs(a - b) for a, b in zip(rgb, IMAGE_TOP)) <= 2, rgb
    status = v.status()
    assert 'generates " Two"' in status and "What is in these images?" in status


# ----------------------------------------------------------- variant order

@needs_chromium
def test_variant_order_follows_metadata_else_python(viewer, tmp_path):
    from maskvl.measures import variant_sort_key

    def shown(v: Viewer) -> list[str]:
        opts = v.page.eval_on_selector_all("#variant-select option", "ns => ns.map(n => n.textContent)")
        assert opts == v.page.evaluate("window.maskvlViewer.dataset.variants")
        return opts

    v = viewer().goto()
    # No metadata (prototype format): Python's natural order. The rows' dictionary
    # order is scrambled, and unknown names sit on both sides of Logits.
    scrambled = ["Zeta", "Head_10", "Logits", "MLP", "Attn", "Head_2", "Full", "Head_0", "alpha", "Éclair", "Resid"]
    p = tmp_path / "proto_variants.parquet"
    make_prototype_file(p, ["<|im_start|>", "user", " Hi", "<|vision_start|>"] + ["<|image_pad|>"] * 4
                        + ["<|vision_end|>"], variants=scrambled)
    v.open(p)
    want = sorted(scrambled, key=variant_sort_key)
    assert want[:6] == ["Full", "Attn", "Head_0", "Head_2", "Head_10", "Logits"]  # unknown names after Logits
    assert shown(v) == want
    # maskvl metadata: its `variants` list gives the order, even where it is not the natural
    # one; the rows' dictionary is in yet another order.
    listed = ["Full", "Attn", "Head_0", "Head_1", "Logits", "Resid", "MLP"]
    f = make_maskvl_file(tmp_path / "meta_variants.parquet", grids=((2, 3),), num_layers=2, num_steps=1,
                         variants=sorted(listed), meta_update={"variants": listed})
    v.open(f.path)
    assert shown(v) == listed
    # keys cycle in that order, and a variant's values are its own rows
    names = []
    for _ in listed:
        names.append(v.page.evaluate("window.maskvlViewer.dataset.variants[window.maskvlViewer.state.variant]"))
        press_all(v, ["v"])
    assert names == listed
    v.page.evaluate("""() => { const st = window.maskvlViewer.state;
        st.variant = window.maskvlViewer.dataset.variants.indexOf('Resid'); window.maskvlViewer.render(); }""")
    got = v.values()
    im = got["images"][0]
    np.testing.assert_allclose(np.array(got["image"][:im["count"]], dtype=float),
                               f.values(0, 0, "Resid", "l2_distance")[im["start"]:im["start"] + im["count"]], rtol=1e-6)
    # a variant in the rows that the metadata does not list comes after the listed ones
    f2 = make_maskvl_file(tmp_path / "unlisted.parquet", grids=((2, 2),), num_layers=1, num_steps=1,
                          variants=["Head_1", "Extra", "Full", "Head_0"], meta_update={"variants": ["Full", "Head_1"]})
    v.open(f2.path)
    assert shown(v) == ["Full", "Head_1", "Head_0", "Extra"]


# ------------------------------------------------- status, legend, scale

@needs_chromium
def test_status_line_names_the_prompt_once(viewer, two_images, tmp_path):
    v = viewer().goto()
    v.open(two_images.path)
    lines = v.status().split("\n")
    assert lines[2] == 'prompt: "What is in these images?"', lines
    assert "prompt prompt" not in v.status()
    # files of several named prompts (the prototype's format) keep the name
    p = tmp_path / "named.parquet"
    make_prototype_file(p, ["<|im_start|>", " Hi"] + ["<|image_pad|>"] * 4, prompt_name="cats", config_prompt="Count.")
    v.open(p)
    v.page.wait_for_function("document.getElementById('status').textContent.includes('Count.')")
    assert v.status().split("\n")[2] == 'prompt cats: "Count."'


@needs_chromium
def test_pin_legend_has_swatches_not_hex_codes(viewer, tmp_path):
    f = make_maskvl_file(tmp_path / "three_steps.parquet", grids=((3, 4),), num_layers=5, num_heads=2, num_steps=3)
    v = viewer().goto()
    v.open(f.path)
    v.page.click("#view-a .chip >> nth=2")
    assert v.page.is_visible("#pin-legend")
    legend = v.page.text_content("#pin-legend")
    assert not re.search(r"#[0-9a-fA-F]{3,8}\b", legend), legend
    items = v.page.eval_on_selector_all("#pin-legend .legend-item", """ns => ns.map(n => ({
        text: n.textContent, swatch: getComputedStyle(n.querySelector('.swatch')).backgroundColor,
        w: n.querySelector('.swatch').getBoundingClientRect().width, current: n.classList.contains('current') }))""")
    assert [it["text"] for it in items] == ["step 0", "step 1", "step 2"]
    assert all(it["w"] > 8 for it in items)  # a visible swatch
    assert [it["current"] for it in items] == [True, False, False]
    # each swatch has its line's colour, and the chart draws that colour
    chart = set(v.page.evaluate("""() => { const c = document.getElementById('pin-chart'); const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; const s = new Set(); for (let i = 0; i < d.length; i += 4)
        s.add(`rgb(${d[i]}, ${d[i+1]}, ${d[i+2]})`); return [...s]; }"""))
    swatches = [it["swatch"] for it in items]
    assert len(set(swatches)) == 3 and set(swatches) <= chart, (swatches, len(chart))
    press_all(v, ["ArrowDown"])
    assert v.page.eval_on_selector_all("#pin-legend .legend-item.current", "ns => ns.map(n => n.textContent)") == ["step 1"]


@needs_chromium
def test_nonpositive_layer_says_so_and_keeps_a_scale(viewer, tmp_path):
    f = make_maskvl_file(tmp_path / "bf16_like.parquet", grids=((6, 8),), num_layers=3, num_heads=2, num_steps=1,
                         nonpositive_layer=1)
    v = viewer().goto()
    v.open(f.path)
    assert not v.page.is_visible("#scale-note")
    set_view(v, metric="cosine_distance", layer=1, variant="Full")
    note = v.page.text_content("#scale-note")
    assert v.page.is_visible("#scale-note")
    assert "Every image value here is ≤ 0" in note and "-0.00781" in note, note
    assert "Every text value here is ≤ 0" in note
    labels = v.page.eval_on_selector_all("#cbar-image-labels span", "ns => ns.map(n => n.textContent)")
    assert labels[0] == "-0.00781" and labels[-1] == "0" and len(set(labels)) == 5, labels
    # the grid is drawn on that scale: 0 has the top colour, -2**-7 the bottom (white)
    want = f.values(0, 1, "Full", "cosine_distance")
    im = f.meta["images"][0]
    cells = want[im["token_start"]:im["token_end"]]
    k = next(k for k in range(1, len(cells)) if cells[k] == 0)
    rgb = v.pixel("#view-a canvas[data-image='0']", (k % 8 + 0.5) / 8, (k // 8 + 0.5) / 6)
    assert max(abs(a - b) for a, b in zip(rgb, IMAGE_TOP)) <= 2, (k, rgb)
    k = next(k for k in range(1, len(cells)) if cells[k] < 0)
    assert v.pixel("#view-a canvas[data-image='0']", (k % 8 + 0.5) / 8, (k // 8 + 0.5) / 6) == (255, 255, 255)
    # every value exactly 0: said so, and a 0..1 scale rather than 0..0
    set_view(v, variant="Attn")
    note = v.page.text_content("#scale-note")
    assert "Every image value here is 0" in note, note
    labels = v.page.eval_on_selector_all("#cbar-image-labels span", "ns => ns.map(n => n.textContent)")
    assert labels[0] == "0" and labels[-1] == "1.00", labels
    # a layer with positive values: no note, 0..max as before
    set_view(v, variant="Full", layer=2)
    assert not v.page.is_visible("#scale-note")
    assert v.page.eval_on_selector_all("#cbar-image-labels span", "ns => ns[0].textContent") == "0"


@needs_chromium
def test_prototype_bf16_layer_note(viewer):
    if not SMALL_PROTOTYPE.exists():
        pytest.skip(f"prototype file {SMALL_PROTOTYPE} not present")
    v = viewer().goto()
    v.open(SMALL_PROTOTYPE)
    # cosine distance of Head_0 at layer 0, step 0: -0.0078 on every image token, 0 on every
    # text token (bf16 rounding)
    set_view(v, metric="cosine_distance", layer=0, step=0, variant="Head_0")
    note = v.page.text_content("#scale-note")
    assert v.page.is_visible("#scale-note"), note
    assert "Every image value here is -0.00780" in note and "rounding error" in note, note
    assert "Every text value here is 0" in note, note
    labels = v.page.eval_on_selector_all("#cbar-image-labels span", "ns => ns.map(n => n.textContent)")
    assert labels[0] == "-0.00780" and labels[-1] == "0", labels
    # the Full variant at layer 4 mixes 0 and -0.0078 over the image: a min..max scale
    set_view(v, variant="Full", layer=4)
    note = v.page.text_content("#scale-note")
    assert "Every image value here is ≤ 0 (from -0.00780 to 0)" in note, note


# ------------------------------------------------------------------- keys

@needs_chromium
def test_key_navigation(viewer, two_images):
    v = viewer(height=420).goto()  # short viewport: the page can scroll
    v.open(two_images.path)
    v.page.evaluate("""() => { window.__prevented = []; window.addEventListener('keydown',
        (e) => window.__prevented.push([e.key, e.defaultPrevented])); }""")
    assert v.page.evaluate("document.documentElement.scrollHeight > window.innerHeight")
    s = v.state()
    assert (s["layer"], s["step"], s["variant"], s["metric"], s["scaling"]) == (0, 0, 0, "l2_distance", "linear")
    press_all(v, ["ArrowRight", "ArrowRight"])
    assert v.state()["layer"] == 2 and "Layer 2 (3 of 4)" in v.status()
    press_all(v, ["ArrowLeft"])
    assert v.state()["layer"] == 1
    press_all(v, ["ArrowLeft", "ArrowLeft"])  # clamps at 0
    assert v.state()["layer"] == 0
    press_all(v, ["ArrowDown"])
    assert v.state()["step"] == 1 and "step 1 (2 of 2)" in v.status()
    press_all(v, ["ArrowDown"])  # clamps at the last step
    assert v.state()["step"] == 1
    press_all(v, ["ArrowUp"])
    assert v.state()["step"] == 0
    assert v.page.evaluate("window.scrollY") == 0  # arrows did not scroll the page
    press_all(v, ["m"])
    assert v.state()["metric"] == "cosine_distance" and "cosine distance" in v.status()
    press_all(v, ["M"])
    assert v.state()["metric"] == "l2_distance"
    seen = []
    for _ in range(3):
        press_all(v, ["s"])
        seen.append(v.state()["scaling"])
    assert seen == ["sqrt", "percentile", "linear"]
    # variants cycle in natural order with V / ], backwards with Shift+V / [
    names = []
    for _ in range(len(two_images.variants)):
        names.append(v.page.evaluate("window.maskvlViewer.dataset.variants[window.maskvlViewer.state.variant]"))
        press_all(v, ["v"])
    assert names == natural_variants(12, True)
    assert v.state()["variant"] == 0  # wrapped around
    press_all(v, ["Shift+V"])
    assert v.state()["variant"] == len(two_images.variants) - 1  # Logits
    # on Logits, M also offers the logits metrics
    metrics = []
    for _ in range(4):
        press_all(v, ["m"])
        metrics.append(v.state()["metric"])
    assert metrics == ["cosine_distance", "kl_divergence", "target_prob_delta", "l2_distance"]
    press_all(v, ["]", "]"])
    assert v.state()["variant"] == 1
    press_all(v, ["["])
    assert v.state()["variant"] == 0
    # keys with Ctrl / Alt / Meta are not captured and change nothing
    before = v.state()
    n = v.page.evaluate("window.__prevented.length")
    for k in ["Control+ArrowRight", "Alt+ArrowRight", "Meta+ArrowRight", "Control+m", "Alt+v", "Control+s"]:
        v.page.keyboard.press(k)
    assert v.state() == before
    events = v.page.evaluate("window.__prevented")[n:]
    assert events and not any(prevented for _, prevented in events), events
    # handled keys were prevented (no scrolling, no browser action)
    assert all(p for k, p in v.page.evaluate("window.__prevented")[:n] if k in ("ArrowDown", "ArrowUp"))
    # typing in a text field is left alone
    v.page.click("#grid-override")
    v.page.keyboard.type("m")
    assert v.state()["metric"] == before["metric"]
    assert v.page.input_value("#grid-override") == "m"


# ---------------------------------------------------------------- overlay

@needs_chromium
def test_overlay_and_opacity(viewer, two_images):
    v = viewer().goto()
    v.open(two_images.path)
    sel0 = "#view-a canvas[data-image='0']"
    heat_tl = v.pixel(sel0, 0.3 / 10, 2.5 / 7)
    heat_br = v.pixel(sel0, 9.5 / 10, 6.5 / 7)

    def set_opacity(pct):
        v.page.evaluate("""(p) => { const r = document.getElementById('opacity'); r.value = String(p);
                           r.dispatchEvent(new Event('input', { bubbles: true })); }""", pct)

    # images picked by file name (they are the files the metadata names)
    v.page.set_input_files("#image-input", two_images.meta["images"][1]["path"])
    v.page.set_input_files("#image-input", two_images.meta["images"][0]["path"])
    v.page.wait_for_function("window.maskvlViewer.imagesLoaded().filter(Boolean).length === 2")
    set_opacity(0)
    # heatmap invisible: the image, stretched to the grid's full extent
    assert v.pixel(sel0, 0.01, 0.01) == (255, 0, 0)
    assert v.pixel(sel0, 0.45, 0.99) == (255, 0, 0)
    assert v.pixel(sel0, 0.55, 0.01) == (0, 0, 255)
    assert v.pixel(sel0, 0.99, 0.99) == (0, 0, 255)
    assert v.pixel("#view-a canvas[data-image='1']", 0.5, 0.5) == (0, 200, 0)
    # full opacity: exactly the heatmap colours
    set_opacity(100)
    assert v.pixel(sel0, 0.3 / 10, 2.5 / 7) == heat_tl
    assert v.pixel(sel0, 9.5 / 10, 6.5 / 7) == heat_br
    # half: a blend of the two, heatmap colour kept (not washed out to grey)
    set_opacity(50)
    mid = v.pixel(sel0, 9.5 / 10, 6.5 / 7)
    want = [(a + b) / 2 for a, b in zip(heat_br, (0, 0, 255))]
    assert all(abs(a - b) <= 3 for a, b in zip(mid, want)), (mid, want)
    assert v.page.text_content("#opacity-label") == "50%"


# -------------------------------------------------------------------- XSS

def _xss_checks(v: Viewer):
    # the payloads are shown as text ...
    chips = v.page.eval_on_selector_all("#view-a .chip .t", "ns => ns.map(n => n.textContent)")
    assert "·<img·src=x·onerror=alert(1)>" in chips  # leading space shown as ·
    assert XSS_SCRIPT in chips
    assert XSS_SCRIPT in v.status() and XSS_IMG in v.status()
    # ... and nothing was injected or run
    assert v.page.evaluate("document.querySelectorAll('img').length") == 0
    assert v.page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    scripts = v.page.evaluate("Array.from(document.scripts).map(s => s.src ? 'src' : (s.type || 'inline'))")
    assert all(s in ("src", "inline", "application/octet-stream", "application/json") for s in scripts)
    # the viewer's own scripts (or their inlined copies) and the two data blocks, nothing injected
    assert len(scripts) <= len(_index_scripts()) + 2
    # hovering a malicious chip shows it as text too
    chip = v.page.locator("#view-a .chip", has_text="alert(1)</script>").first
    chip.hover()
    assert XSS_SCRIPT in v.page.text_content("#tooltip")
    v.page.wait_for_timeout(200)
    assert not v.dialogs


@needs_chromium
def test_xss_tokens_and_prompt_are_text(viewer, tmp_path):
    f = make_maskvl_file(tmp_path / "xss.parquet", grids=((2, 3),), num_heads=2, logits=False,
                         question=[" " + XSS_IMG, XSS_SCRIPT, " ok"], prompt=f"Look {XSS_IMG} {XSS_SCRIPT}",
                         meta_update={"model": XSS_SCRIPT})
    v = viewer().goto()
    v.open(f.path)
    _xss_checks(v)
    p = tmp_path / "xss_proto.parquet"
    make_prototype_file(p, ["<|im_start|>", "user", " " + XSS_IMG, XSS_SCRIPT, "<|vision_start|>"]
                        + ["<|image_pad|>"] * 6 + ["<|vision_end|>", "\n"],
                        prompt_name=XSS_IMG, config_prompt=f"{XSS_IMG} {XSS_SCRIPT}")
    v.open(p)
    v.page.wait_for_function("document.getElementById('status').textContent.includes('onerror')")
    _xss_checks(v)
    # self-contained page of a file whose NAME is hostile too
    hostile = tmp_path / f'x"><img src=x onerror=alert(1)>.parquet'
    hostile.write_bytes(f.path.read_bytes())
    page = write_page(hostile, tmp_path / "xss.html", images=[])
    v2 = viewer(bypass_csp=False).goto(page.as_uri())
    v2.page.wait_for_selector("#status:not(:empty)")
    _xss_checks(v2)
    assert "onerror" in v2.page.text_content("#file-name")


# ------------------------------------------------------ self-contained page

@needs_chromium
def test_write_page_self_contained(viewer, two_images, tmp_path):
    out = write_page(two_images.path, tmp_path / "page.html")  # images come from the metadata
    assert out == (tmp_path / "page.html").resolve()
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert 'src="' not in text.split("<body>")[1]  # nothing loaded from beside the page
    assert not list(tmp_path.glob(".*.tmp"))
    # real CSP (no bypass): the inline scripts are allowed by hash
    v = viewer(bypass_csp=False).goto(out.as_uri() + "#layer=2&step=1&variant=Head_2&metric=cosine&scale=sqrt")
    v.page.wait_for_selector("#status:not(:empty)")
    v.page.wait_for_function("() => window.maskvlViewer.imagesLoaded().filter(Boolean).length === 2")
    st = v.page.evaluate("() => ({...window.maskvlViewer.state})")
    assert (st["layer"], st["step"], st["metric"], st["scaling"]) == (2, 1, "cosine_distance", "sqrt")
    # the page's CSP lets the WebAssembly zstd decoder run (and nothing else)
    assert v.page.evaluate("() => window.maskvlViewer.zstdDecoder()") == "wasm"
    assert v.page.evaluate("() => window.maskvlViewer.dataset.variants[window.maskvlViewer.state.variant]") == "Head_2"
    assert len(v.page.query_selector_all("#view-a .image-block canvas")) == 2
    # the embedded images are drawn under the heatmap
    v.page.evaluate("""() => { const r = document.getElementById('opacity'); r.value = '0';
                       r.dispatchEvent(new Event('input', { bubbles: true })); }""")
    assert v.pixel("#view-a canvas[data-image='1']", 0.5, 0.5) == (0, 200, 0)
    # the view is written back to the hash, so a link reopens it
    v.page.keyboard.press("ArrowRight")
    v.page.wait_for_function("() => location.hash.includes('layer=3')")
    hash_ = v.page.evaluate("() => location.hash")
    assert "variant=Head_2" in hash_ and "metric=cosine" in hash_ and "step=1" in hash_
    v2 = viewer(bypass_csp=False).goto(out.as_uri() + hash_)
    v2.page.wait_for_selector("#status:not(:empty)")
    assert v2.page.evaluate("() => window.maskvlViewer.state.layer") == 3
    # overwriting an existing page works and is atomic (no temp files left)
    out2 = write_page(two_images.path, out, images=[])
    assert out2 == out and "data:image/png;base64," not in out.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


@needs_chromium
def test_zstd_without_webassembly(viewer, two_images, tmp_path):
    # A page whose CSP forbids WebAssembly: the pure-JS decoder reads the (zstd) file instead.
    text = write_page(two_images.path, tmp_path / "page.html", images=[]).read_text()
    csp = " 'wasm-unsafe-eval'; style-src"  # the end of the CSP's script-src
    assert text.count(csp) == 1
    strict = tmp_path / "strict.html"
    strict.write_text(text.replace(csp, "; style-src"))
    v = viewer(bypass_csp=False).goto(strict.as_uri())
    v.page.wait_for_selector("#status:not(:empty)")
    assert v.page.evaluate("() => window.maskvlViewer.zstdDecoder()") == "js"
    got = v.page.evaluate("() => window.maskvlViewer.currentValues()")
    want = two_images.values(0, 0, "Full", "l2_distance")
    for im in got["images"]:
        np.testing.assert_allclose(np.array(got["image"][im["cellBase"]:im["cellBase"] + im["count"]], dtype=float),
                                   want[im["start"]:im["start"] + im["count"]], rtol=1e-6)
    # the viewer page opened from disk uses the WebAssembly decoder
    v2 = viewer().goto()
    v2.open(two_images.path)
    assert v2.page.evaluate("window.maskvlViewer.zstdDecoder()") == "wasm"


def test_write_page_errors(tmp_path, two_images):
    with pytest.raises(ViewError, match="not found"):
        write_page(tmp_path / "missing.parquet")
    with pytest.raises(ViewError, match="directory"):
        write_page(tmp_path)
    junk = tmp_path / "junk.parquet"
    junk.write_text("hello, not parquet at all")
    with pytest.raises(ViewError, match="not a Parquet file"):
        write_page(junk)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    with pytest.raises(ViewError, match="not a readable Parquet file"):
        write_page(broken)
    with pytest.raises(ViewError, match="Image file not found"):
        write_page(two_images.path, tmp_path / "x.html", images=[str(tmp_path / "nope.png")])
    with pytest.raises(ViewError, match="not a PNG"):
        write_page(two_images.path, tmp_path / "x.html", images=[str(junk)])
    with pytest.raises(ViewError, match="output folder does not exist"):
        write_page(two_images.path, tmp_path / "no" / "such" / "dir" / "x.html")
    for e in (ViewError("x"),):
        assert isinstance(e, ValueError)
    # default output: next to the parquet file
    import shutil
    copy = tmp_path / "copy.parquet"
    shutil.copy(two_images.path, copy)
    assert write_page(copy, images=[]) == (tmp_path / "copy.html").resolve()
    # metadata images that are not readable are skipped, not an error
    f = make_maskvl_file(tmp_path / "noimg.parquet", grids=((2, 2),), num_heads=1, logits=False)
    assert '<script type="application/json" id="maskvl-images">[]</script>' in write_page(f.path).read_text()


# ------------------------------------------------------ screenshot + export

@needs_chromium
def test_screenshot_and_png_export(viewer, two_images):
    from PIL import Image

    v = viewer().goto()
    v.open(two_images.path)
    shot = Image.open(io.BytesIO(v.page.locator("#view-a canvas[data-image='0']").screenshot())).convert("RGB")
    assert shot.size[0] > 100 and shot.size[1] > 60
    px = np.asarray(shot).reshape(-1, 3)
    colours = np.unique(px, axis=0)
    assert len(colours) >= 10, len(colours)  # a real heatmap, not a blank box
    assert (px == 255).all(axis=1).mean() < 0.5  # mostly coloured cells, not background
    url = v.page.evaluate("window.maskvlViewer.exportPNG()")
    assert url.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    assert png.size[0] >= 720 and png.size[1] > 300
    pcolours = np.unique(np.asarray(png).reshape(-1, 3), axis=0).astype(int)
    assert len(pcolours) > 100  # grids + two 256-step colourbars + text
    # the colourbar's dark-red end is in the export
    assert (np.abs(pcolours - np.array(IMAGE_TOP)).max(axis=1) <= 2).any()


# ------------------------------------------------------ extra interactions

@needs_chromium
def test_pin_heads_compare_and_drop(viewer, two_images):
    v = viewer().goto()
    # drag and drop of the parquet file onto the page
    data = base64.b64encode(two_images.path.read_bytes()).decode()
    v.page.evaluate("window.maskvlViewer.perf.load = null")
    dt = v.page.evaluate_handle("""(b64) => { const bin = atob(b64); const u = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
        const d = new DataTransfer(); d.items.add(new File([u], 'dropped.parquet')); return d; }""", data)
    v.page.dispatch_event("body", "drop", {"dataTransfer": dt})
    v.page.wait_for_function("window.maskvlViewer.perf.load !== null")
    assert v.page.evaluate("window.maskvlViewer.perf.load.ok")
    assert v.page.text_content("#file-name") == "dropped.parquet"
    # hover shows a tooltip; click pins the cell and plots it across layers
    canvas = v.page.locator("#view-a canvas[data-image='0']")
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 3.5 / 10, box["y"] + box["height"] * 2.5 / 7
    v.page.mouse.move(x, y)
    tip = v.page.text_content("#tooltip")
    assert "row 2 col 3" in tip and "<|image_pad|>" in tip
    v.page.mouse.click(x, y)
    start = two_images.meta["images"][0]["token_start"]
    assert v.state()["pinned"] == start + 2 * 10 + 3
    assert v.page.is_visible("#pin-chart")
    chart = v.page.evaluate("""() => { const c = document.getElementById('pin-chart'); const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; const s = new Set(); for (let i = 0; i < d.length; i += 4)
        s.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); return [...s]; }""")
    assert "31,119,180" in chart and "214,39,40" in chart  # one line per step (2 steps)
    # all heads as small multiples; clicking one selects it
    v.page.keyboard.press("h")
    assert len(v.page.query_selector_all("#heads-grid .head-tile")) == 12
    v.page.click("#heads-grid .head-tile >> nth=5")
    assert v.page.evaluate("window.maskvlViewer.dataset.variants[window.maskvlViewer.state.variant]") == "Head_5"
    # side by side: two layers
    v.page.select_option("#compare-select", "layer")
    assert v.page.is_visible("#view-b")
    assert len(v.page.query_selector_all("#view-b .image-block canvas")) == 2
    titles = v.page.eval_on_selector_all(".view-title", "ns => ns.map(n => n.textContent)")
    assert titles == ["Layer 0 · step 0", "Layer 1 · step 0"]
    v.page.select_option("#compare-select", "step")
    titles = v.page.eval_on_selector_all(".view-title", "ns => ns.map(n => n.textContent)")
    assert titles == ["Layer 0 · step 0", "Layer 0 · step 1"]
    v.page.keyboard.press("Escape")
    assert v.state()["pinned"] == -1


# ------------------------------------------------------------- bad files

@needs_chromium
def test_malformed_files_give_a_message(viewer, tmp_path, two_images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = []
    junk = tmp_path / "junk.parquet"
    junk.write_text("definitely not parquet")
    cases.append((junk, "not a Parquet file"))
    trunc = tmp_path / "truncated.parquet"
    trunc.write_bytes(two_images.path.read_bytes()[:5000])
    cases.append((trunc, "not a Parquet file"))
    cols = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), cols)
    cases.append((cols, "Missing column(s)"))
    v3 = tmp_path / "v3.parquet"
    make_maskvl_file(v3, grids=((2, 2),), num_heads=1, logits=False, meta_update={"format_version": 3})
    cases.append((v3, "format_version 3"))
    v = viewer().goto()
    for path, phrase in cases:
        load = v.open(path, wait_ok=False)
        assert not load["ok"]
        assert v.page.is_visible("#error")
        assert phrase in v.page.text_content("#error"), v.page.text_content("#error")
    v.open(two_images.path)  # a good file afterwards clears the message
    assert not v.page.is_visible("#error")


def _index_scripts() -> list[str]:
    """The scripts viewer/index.html loads, in order."""
    return re.findall(r'<script src="([^"]+)"></script>', VIEWER_INDEX.read_text())


def test_viewer_sources_are_safe_and_classic():
    names = _index_scripts()
    assert names[0] == "vendor/hyparquet.js" and names[-1] == "app.js", names
    # every script of the viewer folder is loaded, and each is a classic script
    assert sorted(names[1:]) == sorted(p.name for p in (REPO / "viewer").glob("*.js"))
    for name in names[1:]:
        js = (REPO / "viewer" / name).read_text()
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js, name
        assert "eval(" not in js and "new Function" not in js, name
        assert re.search(r"^\s*(import|export)\s", js, re.M) is None, name
        assert js.count("(function (mv) {") == 1 and "})(window.maskvl = window.maskvl || {});" in js, name
    bundle = (REPO / "viewer" / "vendor" / "hyparquet.js").read_text()
    assert re.search(r"^\s*(import|export)\s", bundle, re.M) is None  # classic script, no modules
    assert bundle.lstrip().startswith("/*") and "var hyparquet=" in bundle
    for name in ("LICENSE-hyparquet", "LICENSE-fzstd", "LICENSE-zstddec", "build.sh", "package.json", "package-lock.json"):
        assert (REPO / "viewer" / "vendor" / name).is_file()
    html_ = (REPO / "viewer" / "index.html").read_text()
    assert "http://" not in html_ and "https://" not in html_ and 'type="module"' not in html_

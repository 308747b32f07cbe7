"""The clean pass captures exactly what transformers itself computes (inputs, q/K/V, logits)."""

from __future__ import annotations

import torch

from maskvl.inputs import load_image


def _full_forward(adapter, prep, generated):
    """A fresh cache-less forward of prompt + generated with hidden states, cache and o_proj inputs."""
    ids = prep.input_ids
    inputs = dict(prep.model_inputs)
    if generated:
        extra = torch.tensor([generated])
        ids = torch.cat([ids, extra], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(extra, dtype=torch.int32)], 1)
    o_in = {}
    hs = []
    for i in range(adapter.num_layers):
        hs.append(adapter.o_proj(i).register_forward_pre_hook(
            lambda m, a, i=i: o_in.__setitem__(i, a[0][0, -1].clone())))
    adapter.model.model.rope_deltas = None
    try:
        with torch.no_grad():
            out = adapter.model(input_ids=ids, use_cache=True, output_hidden_states=True, **inputs)
    finally:
        for h in hs:
            h.remove()
    return out, o_in


def test_captured_state_matches_transformers(adapter64, images):
    a = adapter64
    prep = a.prepare("Describe it.", [load_image(str(images["wide"]))], [None])
    cache = a.new_cache()
    caps = [a.prefill(prep, cache)]
    tok = int(caps[0].logits.argmax())
    caps.append(a.decode(tok, cache))
    for step, cap in enumerate(caps):
        out, o_in = _full_forward(a, prep, [tok][:step])
        torch.testing.assert_close(cap.logits, out.logits[0, -1], rtol=1e-10, atol=1e-12)
        for L in range(a.num_layers):
            # Layer inputs at the final position (a text token, so DeepStack never touches it).
            torch.testing.assert_close(cap.x[L], out.hidden_states[L][0, -1], rtol=1e-10, atol=1e-12)
            if step == len(caps) - 1:
                k, v = a.kv(cache, L)
                full = out.past_key_values.layers[L]
                torch.testing.assert_close(k, full.keys[0].transpose(0, 1), rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(v, full.values[0].transpose(0, 1), rtol=1e-10, atol=1e-12)
            # q with the cached K/V reproduces the model's own attention output at the final position.
            k, v = a.kv(cache, L)
            k, v = k[: cap_len(prep, step)], v[: cap_len(prep, step)]
            heads = torch.arange(a.num_heads) // (a.num_heads // a.num_kv_heads)
            s = torch.einsum("hd,thd->ht", cap.q[L], k[:, heads]) * a.scale
            o = torch.einsum("ht,thd->hd", torch.softmax(s, -1), v[:, heads])
            torch.testing.assert_close(o.reshape(-1), o_in[L], rtol=1e-10, atol=1e-12)


def cap_len(prep, step):
    return prep.input_ids.shape[1] + step


def test_image_reaches_the_layers(adapter64, images):
    """The prototype's first error: image positions must hold image features, not the pad embedding."""
    a = adapter64
    prep = a.prepare("Describe it.", [load_image(str(images["wide"]))], [None])
    out, _ = _full_forward(a, prep, [])
    h0 = out.hidden_states[0][0]
    im = prep.images[0]
    pad = a.model.get_input_embeddings().weight[a.image_token_id]
    assert not torch.allclose(h0[im.token_start], pad)
    assert not torch.allclose(h0[im.token_start], h0[im.token_start + 1])

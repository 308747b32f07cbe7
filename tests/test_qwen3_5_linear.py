"""Qwen3.5's linear-attention layer read through maskvl.models.qwen3_5_linear and the gated-delta-rule
knockout op, against transformers' own ``Qwen3_5GatedDeltaNet`` run once clean and once per position with
that position's write skipped (``skip_write``: g_p = 0, beta_p = 0), keeping the final position's output.

transformers runs g, the rule and the gated norm in float32 even in a float64 layer, so the two agree
to float32's resolution of the output (1e-5 of its largest element), not to float64's."""

from __future__ import annotations

import pytest
import torch

from maskvl.models.qwen3_5_linear import linear_inputs, linear_output, linear_scale, skip_write
from maskvl.ops import Backend
from maskvl.ops.testing import compiled_backend

BACKENDS = ["reference", "cpp"]
# (T, Hk, Hv, dk, dv): grouped and ungrouped value heads, odd head dims, T below and above one
# transformers chunk (64) and T = 1.
SHAPES = [(1, 2, 4, 24, 20), (23, 2, 4, 24, 20), (97, 3, 3, 16, 12)]


def _layer(Hk: int, Hv: int, dk: int, dv: int, seed: int, family: str = "qwen3_5"):
    if family == "qwen3_5":
        from transformers import Qwen3_5TextConfig as Config
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet as Layer
    else:
        from transformers import Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet as Layer

    cfg = Config(hidden_size=40, num_hidden_layers=1, layer_types=["linear_attention"],
                            linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=dk,
                            linear_value_head_dim=dv, linear_conv_kernel_dim=4, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=32, vocab_size=64)
    torch.manual_seed(seed)
    layer = Layer(cfg, layer_idx=0).double().eval()
    with torch.no_grad():  # away from the initial values (dt_bias 1, norm weight 1) so each term matters
        layer.dt_bias.uniform_(-2.0, 2.0)
        layer.A_log.uniform_(-1.0, 1.0)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.conv1d.weight.normal_(0.0, 0.5)
    return layer


# qwen3_5_moe's linear layer (Qwen3_5MoeGatedDeltaNet) is the same layer under another name: one shape.
CASES = ([(b, "qwen3_5") + s for b in BACKENDS for s in SHAPES]
         + [("reference", "qwen3_5_moe") + SHAPES[1]])


@pytest.mark.parametrize("backend_name,family,T,Hk,Hv,dk,dv", CASES,
                         ids=[f"{c[0]}-{c[1]}-T{c[2]}-Hk{c[3]}-Hv{c[4]}-dk{c[5]}-dv{c[6]}" for c in CASES])
def test_linear_layer_knockout_matches_transformers_layer(backend_name, family, T, Hk, Hv, dk, dv):
    backend, dev = (Backend(), torch.device("cpu")) if backend_name == "reference" else compiled_backend(backend_name)
    layer = _layer(Hk, Hv, dk, dv, seed=T, family=family)
    x = torch.randn(T, 40, dtype=torch.float64)
    with torch.no_grad():
        clean = layer(x[None])[0, -1]  # [hidden]
        q, k, v, g, beta, z = linear_inputs(layer, x)
        o, delta = backend.gated_delta_knockout(*(t.to(dev) for t in (q[-1], k, v, g, beta)), linear_scale(layer), True)
        o, delta = o.cpu(), delta.cpu()
        atol = 1e-5 * float(clean.abs().max())
        torch.testing.assert_close(linear_output(layer, o, z[-1]), clean, rtol=0.0, atol=atol)
        for p in range(T):
            with skip_write(layer, p):
                knocked = layer(x[None])[0, -1]
            ours = linear_output(layer, o + delta[p], z[-1])
            torch.testing.assert_close(ours, knocked, rtol=0.0, atol=atol, msg=lambda m: f"p={p}: {m}")
        # The final position's own write moves the output far beyond the tolerance: the check can fail.
        assert float((linear_output(layer, o + delta[-1], z[-1]) - clean).abs().max()) > 1e3 * atol
    # skip_write leaves no hook behind.
    with torch.no_grad():
        assert torch.equal(layer(x[None])[0, -1], clean)


@pytest.mark.parametrize("T", [1, 2, 23], ids=lambda t: f"T{t}")
def test_final_step_on_shared_states_matches_full_recurrence(T):
    """final_step (each row's own single step on the shared clean conv tail and state) against the whole
    sequence with the final input replaced, read through linear_inputs and the op's reference: float64
    to 1e-12 relative; and against transformers' layer to float32's resolution. T = 1, 2 are shorter
    than the conv kernel (zero tail rows)."""
    from maskvl.models.qwen3_5_linear import final_step, prefix_state
    from maskvl.ops.gated_delta_knockout import gated_delta_knockout_reference

    layer = _layer(2, 4, 24, 20, seed=100 + T)
    x = torch.randn(T, 40, dtype=torch.float64)
    rows = torch.randn(3, 40, dtype=torch.float64)
    with torch.no_grad():
        tail, S = prefix_state(layer, x[:-1])
        got = final_step(layer, rows, tail, S)
        assert got.shape == (3, 40)
        for i in range(3):
            full = torch.cat([x[:-1], rows[i:i + 1]])
            q, k, v, g, beta, z = linear_inputs(layer, full)
            o, _ = gated_delta_knockout_reference(q[-1], k, v, g, beta, linear_scale(layer), True)
            want = linear_output(layer, o, z[-1])
            torch.testing.assert_close(got[i], want, rtol=0.0, atol=1e-12 * float(want.abs().max()))
            theirs = layer(full[None])[0, -1]
            torch.testing.assert_close(got[i], theirs, rtol=0.0, atol=1e-5 * float(theirs.abs().max()))


def test_head_output_is_out_proj_on_one_heads_slice():
    """Head_N rows of a linear layer: out_proj applied to value head N's slice of the gated norm's output
    (the other heads zeroed); the heads' shares sum to the layer's output (float64, 1e-12)."""
    from maskvl.models.qwen3_5_linear import gated_norm, head_output

    layer = _layer(2, 4, 24, 20, seed=7)
    core = torch.randn(3, 4, 20, dtype=torch.float64)
    z = torch.randn(3, 4, 20, dtype=torch.float64)
    with torch.no_grad():
        normed = gated_norm(layer, core, z)
        total = linear_output(layer, core, z)
        shares = [head_output(layer, normed, h) for h in range(4)]
        for h in range(4):
            only = torch.zeros_like(normed)
            only[:, h] = normed[:, h]
            want = layer.out_proj(only.reshape(3, -1))
            torch.testing.assert_close(shares[h], want, rtol=0.0, atol=1e-12 * float(want.abs().max()))
        torch.testing.assert_close(sum(shares), total, rtol=0.0, atol=1e-12 * float(total.abs().max()))
        # gated_norm is transformers' Qwen3_5RMSNormGated (which normalises in float32) to its resolution.
        theirs = layer.norm(core.reshape(-1, 20), z.reshape(-1, 20)).reshape(3, 4, 20)
        torch.testing.assert_close(normed, theirs, rtol=0.0, atol=1e-6 * float(theirs.abs().max()))

"""Leave-group-out attention for the final query: schema, fake kernel, reference and backend dispatch.

The group generalisation of ``maskvl/ops/loo_attention.py``. For one query row ``q [H, D]`` against
keys/values ``k, v [T, KV, D]`` (GQA: head ``h`` reads KV head ``h // (H // KV)``) and NG groups of
key positions, returns the clean head outputs and, for every group G, the change of every head's
output when all keys of G are removed from the softmax at once:

    a_hj   = softmax_j(scale * <q_h, k_j>)
    o_h    = sum_j a_hj v_j
    A_hG   = sum_{j in G} a_hj                (the removed attention mass)
    U_hG   = sum_{j in G} a_hj v_j
    o_h^(-G)    = (o_h - U_hG) / (1 - A_hG)
    delta[G, h] = o_h^(-G) - o_h = (A_hG o_h - U_hG) / (1 - A_hG)

Groups come as a CSR list: group ``g`` is ``members[offsets[g]:offsets[g + 1]]`` (distinct positions
in ``[0, T)``; groups may overlap and may be empty). Cost: one attention pass plus O(M H D) for the
M = ``len(members)`` memberships, the same order as the single-key op.

Numerics: ``1 - A_hG`` is computed from weights that are each exact to a relative rounding error, so
its absolute error is about ``eps`` and its relative error ``eps / (1 - A_hG)``: harmless while the
group holds at most half the head's attention mass. Where ``A_hG > 1/2`` (a group holding an attention
sink, or most of the keys) the cancellation is real: those (head, group) pairs are recomputed
directly, as a softmax over the remaining keys only. With disjoint groups at most one group per head
can pass 1/2, so this costs at most H extra single-head attention passes; overlapping groups may cost
more. A group holding every key leaves nothing to attend to: the masked output is defined as zero
(``delta = -o``), as for the single key when ``T == 1``.

Arithmetic is in float64 for float64 inputs and float32 otherwise (bf16/fp16 are upcast).
Implementations: :func:`loo_group_attention_reference` (here), ``csrc/loo_group_attention.cpp`` (CPU),
``kernels/loo_group_attention.py`` (Triton).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype
from ._library import define

OP = define("loo_group_attention", "(Tensor q, Tensor k, Tensor v, float scale, Tensor members, Tensor offsets) "
            "-> (Tensor, Tensor)")


@torch.library.register_fake(OP)
def _fake(q, k, v, scale, members, offsets):
    H, D = q.shape
    NG = offsets.shape[0] - 1
    cd = compute_dtype(q.dtype)
    return q.new_empty((H, D), dtype=cd), q.new_empty((NG, H, D), dtype=cd)

#: Removed attention mass above which a (head, group) pair is recomputed directly.
DIRECT_ABOVE = 0.5


def check_groups(members: torch.Tensor, offsets: torch.Tensor, T: int, what: str = "loo_group_attention") -> int:
    """Check a CSR group list against ``T`` keys; returns the number of groups NG.

    ``members [M]`` integer positions in ``[0, T)``; ``offsets [NG + 1]`` integer, non-decreasing,
    from 0 to M. Raises ``ValueError`` naming ``what``.
    """
    if members.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{what}: need members [M] and offsets [NG + 1]; got {tuple(members.shape)}, "
                         f"{tuple(offsets.shape)}")
    if members.dtype.is_floating_point or offsets.dtype.is_floating_point:
        raise ValueError(f"{what}: members and offsets must be integer tensors")
    off = offsets.to("cpu", torch.int64)
    if int(off[0]) != 0 or int(off[-1]) != members.numel() or bool((off.diff() < 0).any()):
        raise ValueError(f"{what}: offsets must rise from 0 to len(members) = {members.numel()}")
    if members.numel() and (int(members.min()) < 0 or int(members.max()) >= T):
        raise ValueError(f"{what}: members must lie in [0, {T})")
    return off.numel() - 1


def member_pairs(members: torch.Tensor, offsets: torch.Tensor, groups: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the groups ``groups [n]`` (indices, may repeat): ``(row [R], position [R])``, one pair per
    membership, ``row`` indexing ``groups``. Vectorised gather of CSR segments, on ``members``' device."""
    offsets = offsets.to(members.device, torch.int64)
    groups = groups.to(members.device, torch.int64)
    start = offsets[groups]
    size = offsets[groups + 1] - start
    row = torch.repeat_interleave(torch.arange(groups.numel(), device=members.device), size)
    # Position of each pair inside its segment: global index minus the segment's first global index.
    first = torch.cumsum(size, 0) - size
    inner = torch.arange(row.numel(), device=members.device) - first[row]
    return row, members.to(torch.int64)[start[row] + inner]


def loo_group_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, members: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch leave-group-out attention.

    Args:
        q: ``[H, D]`` the final position's query (after q_norm and RoPE).
        k: ``[T, KV, D]`` keys of all positions (after k_norm and RoPE).
        v: ``[T, KV, D]`` values of all positions.
        scale: softmax scale.
        members: ``[M]`` int, the groups' positions, group after group.
        offsets: ``[NG + 1]`` int, group ``g`` is ``members[offsets[g]:offsets[g + 1]]``.

    Returns:
        ``o [H, D]`` clean head outputs and ``delta [NG, H, D]`` (masked minus clean), in the compute
        dtype (float64 for float64 inputs, else float32).
    """
    H, D = q.shape
    T, KV, _ = k.shape
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} KV heads")
    NG = check_groups(members, offsets, T)
    cd = compute_dtype(q.dtype)
    dev = q.device
    kv_of_head = torch.arange(H, device=dev) // (H // KV)
    qf = q.to(cd)
    kh = k.to(cd)[:, kv_of_head, :].transpose(0, 1)  # [H, T, D]
    vh = v.to(cd)[:, kv_of_head, :].transpose(0, 1)  # [H, T, D]
    s = torch.einsum("hd,htd->ht", qf, kh) * scale  # [H, T]
    a = torch.softmax(s, dim=-1)
    o = torch.einsum("ht,htd->hd", a, vh)  # [H, D]
    members = members.to(dev, torch.int64)
    offsets = offsets.to(dev, torch.int64)
    gid, pos = member_pairs(members, offsets, torch.arange(NG, device=dev))  # [M] each
    w = a[:, pos]  # [H, M]
    A = a.new_zeros(H, NG).index_add_(1, gid, w)
    U = a.new_zeros(H, NG, D).index_add_(1, gid, w.unsqueeze(-1) * vh[:, pos])
    delta = (A.unsqueeze(-1) * o.unsqueeze(1) - U) / (1 - A).unsqueeze(-1)  # [H, NG, D]
    # Where the group holds over half the mass, 1 - A cancels: softmax over the remaining keys directly.
    hs, gs = torch.nonzero(A > DIRECT_ABOVE, as_tuple=True)
    if hs.numel():
        keep = torch.ones(hs.numel(), T, dtype=torch.bool, device=dev)
        row, col = member_pairs(members, offsets, gs)
        keep[row, col] = False
        sd = s[hs].masked_fill(~keep, float("-inf"))
        ow = torch.einsum("nt,ntd->nd", torch.softmax(sd, dim=-1), vh[hs])
        ow = torch.where(keep.any(-1, keepdim=True), ow, 0.0)  # no key left: masked output 0
        delta[hs, gs] = ow - o[hs]
    return o, delta.transpose(0, 1).contiguous()


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, members: torch.Tensor,
            offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel, through the dispatcher."""
    o, delta = torch.ops.maskvl.loo_group_attention(q, k, v, float(scale), members, offsets)
    return o, delta


def run_triton(kernels: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               members: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if q.is_cuda:
        o, delta = torch.ops.maskvl.loo_group_attention(q, k, v, float(scale), members, offsets)
        return o, delta
    return kernels.loo_group_attention.loo_group_attention(q, k, v, float(scale), members, offsets)


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.loo_group_attention.loo_group_attention

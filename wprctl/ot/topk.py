"""The top-k compressed form of a (policy, reference) pair of next-token distributions.

Computed once at rollout from the two (B, T, V) logit tensors, it keeps per position only the
support the well-posed penalty needs, S = top-k(a) U top-k(b) U {y}, as at most 2k + 1 slots
(token ids, both log-probabilities, a validity flag for duplicate ids) plus the two tail masses
1 - a(S) and 1 - b(S) and the two tail sums over the tokens outside S of a log a and b log b
(what the well-posed method needs to stand the lumped tail in for its tokens in the centering
and the OT value). Memory per position is O(k), independent of the vocabulary
size V.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from wprctl.errors import UserError
from wprctl.ot.threads import backend_threads
from wprctl.ot.topk_cpu import compress_rows

# logit entries per row block of compress_topk (see there)
BLOCK_ENTRIES_TENSOR = 2**20
BLOCK_ENTRIES_COMPILED = 2**23


@dataclass
class TopKPair:
    """Per-position support (sorted token ids; duplicates flagged invalid) with both log-probs.

    Positions outside ``mask`` are not computed: they hold a placeholder, the action alone with
    probability 1 under both distributions, which no solver reads."""

    indices: torch.Tensor  # (B, T, S) int64 token ids, sorted per position
    logp: torch.Tensor  # (B, T, S) float32 policy log-probabilities
    logq: torch.Tensor  # (B, T, S) float32 reference log-probabilities
    valid: torch.Tensor  # (B, T, S) bool, False for repeated ids
    tail_p: torch.Tensor  # (B, T) float64 policy mass outside the support
    tail_q: torch.Tensor  # (B, T) float64 reference mass outside the support
    # (B, T) float64 sums over the tokens outside the support (0 when there are none)
    tail_plogp: torch.Tensor  # sum a log a
    tail_qlogq: torch.Tensor  # sum b log b
    actions: torch.Tensor  # (B, T) int64
    action_slot: torch.Tensor  # (B, T) int64, slot of the action in the support
    mask: torch.Tensor  # (B, T) bool, positions that get a penalty
    vocab_size: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.actions.shape[0]), int(self.actions.shape[1]))

    def nbytes(self) -> int:
        """Bytes held by the compressed tensors."""
        return sum(
            t.numel() * t.element_size()
            for t in (
                self.indices, self.logp, self.logq, self.valid, self.tail_p, self.tail_q,
                self.tail_plogp, self.tail_qlogq,
                self.actions, self.action_slot, self.mask,
            )
        )  # fmt: skip

    def to(self, device: torch.device | str) -> TopKPair:
        moved = {
            name: getattr(self, name).to(device)
            for name in (
                "indices", "logp", "logq", "valid", "tail_p", "tail_q",
                "tail_plogp", "tail_qlogq",
                "actions", "action_slot", "mask",
            )
        }  # fmt: skip
        return TopKPair(**moved, vocab_size=self.vocab_size, k=self.k)


def check_logits(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate shapes; return the (B, T) bool mask (all positions when ``mask`` is None)."""
    for name, t in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserError(f"WPR: {name} must be a (B, T, V) tensor, got shape {got}")
    if policy_logits.shape != ref_logits.shape:
        raise UserError(
            f"WPR: policy_logits {tuple(policy_logits.shape)} and ref_logits "
            f"{tuple(ref_logits.shape)} must have the same (B, T, V) shape"
        )
    B, T, V = policy_logits.shape
    if not isinstance(actions, torch.Tensor) or tuple(actions.shape) != (B, T):
        got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
        raise UserError(f"WPR: actions must be (B, T) = ({B}, {T}) token ids, got {got}")
    if actions.dtype.is_floating_point or actions.dtype == torch.bool:
        raise UserError(f"WPR: actions must be integer token ids, got dtype {actions.dtype}")
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= V):
        raise UserError(
            f"WPR: actions must be token ids in [0, {V - 1}], got values in "
            f"[{int(actions.min())}, {int(actions.max())}]"
        )
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=actions.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UserError(f"WPR: mask must be (B, T) = ({B}, {T}), got {got}")
    return mask.to(torch.bool)


def _tail(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - sum of the valid slots' probabilities, in float64, clamped at 0."""
    lse = torch.logsumexp(logp.double().masked_fill(~valid, -torch.inf), dim=-1)
    return (-torch.expm1(lse)).clamp_min(0.0)


def _softmax_lse(x: torch.Tensor, top: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) and logsumexp(x) along the last dim without a second exp pass.

    ``top`` (rows, 1): the index of each row's largest entry (None: found here). The fused
    softmax is about twice as fast as exp(x - max) on CPU, and lse = x_max - log p_max.
    """
    p = torch.softmax(x, dim=-1)
    if top is None:
        top = x.argmax(dim=-1, keepdim=True)
    lse = x.gather(1, top).squeeze(1) - torch.log(p.gather(1, top).squeeze(1))
    return p, lse


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x log y with 0 log y = 0."""
    return torch.where(x > 0, x * torch.log(y), torch.zeros_like(x))


def _tail_sums(
    sums: torch.Tensor,
    logp: torch.Tensor,
    logq: torch.Tensor,
    valid: torch.Tensor,
    tail_p: torch.Tensor,
    tail_q: torch.Tensor,
    full: bool,
) -> torch.Tensor:
    """(2, B, T) whole-vocabulary sums minus the support's part.

    Where a sum is not finite (a token with mass under one distribution and probability 0, i.e.
    a -inf logit, under the other) it falls back to the lumped value (tail mass) log (tail mass),
    which makes the solver's tail correction 0 there.
    """
    lumped = torch.stack([_xlogy(tail_p, tail_p), _xlogy(tail_q, tail_q)])
    if full:  # no tail tokens: at most a rounding rest, which stays lumped
        return lumped
    lp = logp.double().masked_fill(~valid, -torch.inf)
    lq = logq.double().masked_fill(~valid, -torch.inf)
    p, q = lp.exp(), lq.exp()

    def dot(m: torch.Tensor, lx: torch.Tensor) -> torch.Tensor:
        return torch.where(m > 0, m * lx, torch.zeros_like(m)).sum(-1)

    support = torch.stack([dot(p, lp), dot(q, lq)])
    # a tail sum of x log y is <= 0 (masses <= 1); rounding can leave a tiny positive rest
    out = (sums - support).clamp_max(0.0)
    return torch.where(torch.isfinite(out), out, lumped)


def check_finite_rows(x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, T: int) -> None:
    """NaN or +inf logits (a diverged model), or a row with every logit -inf, have no softmax:
    say where, rather than let a NaN support or penalty through (the compiled selection does not
    rank NaN at all)."""
    for name, t in (("policy_logits", x), ("ref_logits", z)):
        # one pass: a row's max is NaN if it holds a NaN (amax propagates it), +inf if it holds
        # +inf, -inf if every entry is -inf; finite otherwise
        bad = ~torch.isfinite(t.amax(dim=-1))
        if bool(bad.any()):
            r = int(rows[int(bad.nonzero()[0, 0])])
            raise UserError(
                f"WPR: {name} at position (b={r // T}, t={r % T}) hold NaN or +inf (or only -inf)"
            )


def _block_rows(x: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """Rows ``rows`` (flat b * T + t) of the (B, T, V) ``x`` as (n, V), copying no other row.

    ``span`` (lo, hi): the rows are lo..hi-1, so a view serves when ``x`` is one (B * T, V)
    block. A slice of longer logits (PPO's response positions of prompt + response logits) is
    not: ``reshape`` would copy all B * T rows at once, and a gather copies just this block's.
    """
    B, T, V = x.shape
    try:
        flat = x.view(B * T, V)
    except RuntimeError:
        return x[rows // T, rows % T]
    return flat[span[0] : span[1]] if span is not None else flat.index_select(0, rows)


def batch_support(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch-wide support: the sorted union over the positions in ``mask`` of top-k(a),
    top-k(b) and the action (the official trainer's support, without its pad and eos rule).

    Only the top-k ids are needed, not a compression: top-k of the logits is top-k of the
    probabilities. Among tied logits at the k-th place the choice is ``torch.topk``'s."""
    mask_b = check_logits(policy_logits, ref_logits, actions, mask)
    _, T, V = policy_logits.shape
    if k >= V:
        return torch.arange(V, device=policy_logits.device)
    rows = mask_b.reshape(-1).nonzero().squeeze(1)
    found = [actions.reshape(-1).index_select(0, rows).long()]
    block = max(1, BLOCK_ENTRIES_TENSOR // V)
    for lo in range(0, rows.numel(), block):
        r = rows[lo : lo + block]
        x = _block_rows(policy_logits, r, None).float()
        z = _block_rows(ref_logits, r, None).float()
        check_finite_rows(x, z, r, T)
        found += [torch.topk(t, k, dim=-1, sorted=False).indices.reshape(-1) for t in (x, z)]
    return torch.unique(torch.cat(found))


def _check_support(
    support: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, V: int
) -> torch.Tensor:
    support = support.to(actions.device, torch.long)
    if support.dim() != 1 or support.numel() == 0:
        raise UserError(
            f"WPR: support must be a non-empty 1-D tensor of token ids, got {tuple(support.shape)}"
        )
    if bool((support[1:] <= support[:-1]).any()) or int(support[0]) < 0 or int(support[-1]) >= V:
        raise UserError(f"WPR: support must hold distinct sorted token ids in [0, {V - 1}]")
    y = actions[mask]
    at = torch.searchsorted(support, y).clamp_max(support.numel() - 1)
    if not bool((support[at] == y).all()):
        raise UserError("WPR: support must hold the action of every masked position")
    return support


def compress_topk(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    support: torch.Tensor | None = None,
) -> TopKPair:
    """Compress two (B, T, V) logit tensors to the per-position support top-k(a) U top-k(b) U {y}.

    With ``k >= V`` the support is the whole vocabulary (no truncation). Only O(k) values per
    position are kept; the full softmax is computed one row block at a time, for the positions
    in ``mask`` only (the others get a placeholder, see below). ``backend`` (``auto``,
    ``compiled``, ``torch``) as in the solvers: on the CPU by compiled code, one pass per row
    (``topk_cpu``), elsewhere by tensor ops and ``torch.topk``. The two pick the same support
    except among tied logits at the k-th place, which the compiled code breaks by the lower token
    id and ``torch.topk`` leaves unspecified, and agree on the masses to float32 rounding.

    ``support`` (sorted distinct token ids holding every masked position's action, e.g.
    ``batch_support``): every position gets these slots instead of its own top-k; ``k`` is then
    only recorded.
    """
    mask_b = check_logits(policy_logits, ref_logits, actions, mask)
    if not isinstance(k, int) or k < 1:
        raise UserError(f"WPR: top_k (k2) must be an integer >= 1, got {k!r}")
    B, T, V = policy_logits.shape
    device = policy_logits.device
    actions = actions.long()
    # fixed slots (a given support, or the whole vocabulary), else each position's own top-k
    if support is not None:
        support = _check_support(support, actions, mask_b, V)
    elif k >= V:
        support = torch.arange(V, device=device)
    S = 2 * k + 1 if support is None else support.numel()
    full = support is not None and S == V  # no token outside the slots
    # Positions outside the mask (padding after an answer) are not computed: they hold the action
    # alone, with probability 1 under both distributions, a placeholder no solver reads.
    idx = actions.unsqueeze(-1).repeat(1, 1, S)
    logp = torch.zeros(B, T, S, dtype=torch.float32, device=device)
    logq = torch.zeros_like(logp)
    flat_idx, flat_lp, flat_lq = idx.view(B * T, S), logp.view(B * T, S), logq.view(B * T, S)
    flat_y = actions.reshape(B * T, 1)
    flat_mask = mask_b.reshape(-1)
    # the rows to compute; None: all of them (read as views where the layout allows)
    todo = None if bool(flat_mask.all()) else flat_mask.nonzero().squeeze(1).to(device)
    n = B * T if todo is None else todo.numel()
    threads = backend_threads(backend, device)
    # Rows per block. Tensor ops: 2^20 entries (4 MB a float32 tensor), so that a block stays in
    # cache from the softmax through the dot products and gathers; at V = 32k, 2 threads, that
    # is 1.5x faster than 64 MB blocks, and 0.5 MB blocks are slower again (op overhead, thread
    # barriers). Compiled: each row is one pass anyway, so a block only bounds the float32 copy
    # of half-precision logits (32 MB); small blocks cost a parallel launch and scratch each
    # (16 blocks of 32 rows at V = 32k took 1.5x the time of one block).
    block = max(1, (BLOCK_ENTRIES_COMPILED if threads else BLOCK_ENTRIES_TENSOR) // V)

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            rows = torch.arange(lo, hi, device=device) if todo is None else todo[lo:hi]
            span = None if todo is not None else (lo, hi)
            yield (
                rows,
                _block_rows(policy_logits, rows, span).float(),
                _block_rows(ref_logits, rows, span).float(),
            )

    if threads:
        # one compiled pass per row (``topk_cpu.compress_rows``): no tensor op per block but
        # the copies in and out
        valid = torch.zeros(B * T, S, dtype=torch.bool, device=device)
        valid[:, 0] = True
        action_slot = torch.zeros(B * T, dtype=torch.long, device=device)
        tails = torch.zeros(B * T, 4, dtype=torch.float64, device=device)
        for rows, x, z in blocks():
            out = compress_rows(x, z, flat_y.index_select(0, rows).view(-1), k, support, full,
                                threads)  # fmt: skip
            bad = out["bad"].nonzero()
            if bad.numel():
                r, side = int(rows[int(bad[0, 0])]), int(out["bad"][int(bad[0, 0])])
                name = "policy_logits" if side == 1 else "ref_logits"
                raise UserError(
                    f"WPR: {name} at position (b={r // T}, t={r % T}) hold NaN or +inf (or "
                    f"only -inf)"
                )
            for dst, name in ((flat_idx, "ids"), (flat_lp, "logp"), (flat_lq, "logq"),
                              (valid, "valid"), (action_slot, "slot"), (tails, "tails")):  # fmt: skip
                dst.index_copy_(0, rows, out[name])
        valid, action_slot = valid.view(B, T, S), action_slot.view(B, T)
        tail_p, tail_q, tail_plogp, tail_qlogq = tails.T.contiguous().view(4, B, T).unbind(0)
    else:
        # whole-vocabulary sums a log a and b log b (the support's part is removed below)
        sums = torch.zeros(2, B * T, dtype=torch.float64, device=device)
        for rows, x, z in blocks():
            check_finite_rows(x, z, rows, T)
            if support is not None:
                ids = support.expand(rows.numel(), S)
                top_x = top_z = None
            else:
                # top-k of the logits = top-k of the log-probabilities; sorted, so column 0 is
                # the max
                top_x = torch.topk(x, k, dim=-1).indices
                top_z = torch.topk(z, k, dim=-1).indices
                ids = torch.cat([top_x, top_z, flat_y.index_select(0, rows)], dim=-1)
                ids = ids.sort(dim=-1).values
                top_x, top_z = top_x[:, :1], top_z[:, :1]
            for row, (t, top, out_lp) in enumerate(((x, top_x, flat_lp), (z, top_z, flat_lq))):
                p, lse = _softmax_lse(t, top)
                # sum p log p = sum p (x - lse); sum p is 1 up to rounding, so it is kept. A -inf
                # logit (probability 0) counts as the lowest float: 0 * -inf would be NaN.
                low = torch.finfo(t.dtype).min
                dot = torch.bmm(p.unsqueeze(1), t.clamp_min(low).unsqueeze(2)).view(-1)
                sums[row].index_copy_(0, rows, dot.double() - lse.double() * p.sum(-1).double())
                out_lp.index_copy_(0, rows, t.gather(1, ids) - lse.unsqueeze(1))
                del p
            flat_idx.index_copy_(0, rows, ids)
        valid = torch.ones(B, T, S, dtype=torch.bool, device=device)
        valid[..., 1:] = idx[..., 1:] != idx[..., :-1]
        action_slot = torch.searchsorted(idx, actions.unsqueeze(-1).contiguous()).squeeze(-1)
        tail_p, tail_q = _tail(logp, valid), _tail(logq, valid)
        tail_plogp, tail_qlogq = _tail_sums(
            sums.view(2, B, T), logp, logq, valid, tail_p, tail_q, full
        )
    return TopKPair(
        indices=idx,
        logp=logp,
        logq=logq,
        valid=valid,
        tail_p=tail_p,
        tail_q=tail_q,
        tail_plogp=tail_plogp,
        tail_qlogq=tail_qlogq,
        actions=actions,
        action_slot=action_slot,
        mask=mask_b,
        vocab_size=V,
        k=k,
    )

"""The top-k compressed form of a (policy, reference) pair of next-token distributions.

Computed once at rollout from the two (B, T, V) logit tensors, it keeps per position only the
support the well-posed penalty needs, S = top-k(a) U top-k(b) U {y}, as at most 2k + 1 slots
(token ids, both log-probabilities, a validity flag for duplicate ids) plus the two tail masses
1 - a(S) and 1 - b(S). Memory per position is O(k), independent of the vocabulary size V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wprctl.errors import UserError


@dataclass
class TopKPair:
    """Per-position support (sorted token ids; duplicates flagged invalid) with both log-probs."""

    indices: torch.Tensor  # (B, T, S) int64 token ids, sorted per position
    logp: torch.Tensor  # (B, T, S) float32 policy log-probabilities
    logq: torch.Tensor  # (B, T, S) float32 reference log-probabilities
    valid: torch.Tensor  # (B, T, S) bool, False for repeated ids
    tail_p: torch.Tensor  # (B, T) float64 policy mass outside the support
    tail_q: torch.Tensor  # (B, T) float64 reference mass outside the support
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
                self.actions, self.action_slot, self.mask,
            )
        )  # fmt: skip

    def to(self, device: torch.device | str) -> TopKPair:
        moved = {
            name: getattr(self, name).to(device)
            for name in (
                "indices", "logp", "logq", "valid", "tail_p", "tail_q",
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


def compress_topk(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
) -> TopKPair:
    """Compress two (B, T, V) logit tensors to the per-position support top-k(a) U top-k(b) U {y}.

    With ``k >= V`` the support is the whole vocabulary (no truncation). Only O(k) values per
    position are kept; the full log-softmax is computed one row block at a time.
    """
    mask_b = check_logits(policy_logits, ref_logits, actions, mask)
    if not isinstance(k, int) or k < 1:
        raise UserError(f"WPR: top_k (k2) must be an integer >= 1, got {k!r}")
    B, T, V = policy_logits.shape
    device = policy_logits.device
    actions = actions.long()
    full = k >= V
    S = V if full else 2 * k + 1
    idx = torch.empty(B, T, S, dtype=torch.long, device=device)
    logp = torch.empty(B, T, S, dtype=torch.float32, device=device)
    logq = torch.empty_like(logp)
    flat_p, flat_q = policy_logits.reshape(B * T, V), ref_logits.reshape(B * T, V)
    flat_idx, flat_lp, flat_lq = idx.view(B * T, S), logp.view(B * T, S), logq.view(B * T, S)
    flat_y = actions.reshape(B * T, 1)
    # Rows per block so a block's float32 log-softmax stays around 64 MB.
    block = max(1, (16 * 2**20) // V)
    for lo in range(0, B * T, block):
        hi = min(B * T, lo + block)
        lp = torch.log_softmax(flat_p[lo:hi].float(), dim=-1)
        lq = torch.log_softmax(flat_q[lo:hi].float(), dim=-1)
        if full:
            ids = torch.arange(V, device=device).expand(hi - lo, V)
        else:
            ids = (
                torch.cat(
                    [
                        torch.topk(lp, k, dim=-1).indices,
                        torch.topk(lq, k, dim=-1).indices,
                        flat_y[lo:hi],
                    ],
                    dim=-1,
                )
                .sort(dim=-1)
                .values
            )
        flat_idx[lo:hi] = ids
        flat_lp[lo:hi] = lp.gather(1, ids)
        flat_lq[lo:hi] = lq.gather(1, ids)
    valid = torch.ones(B, T, S, dtype=torch.bool, device=device)
    valid[..., 1:] = idx[..., 1:] != idx[..., :-1]
    action_slot = torch.searchsorted(idx, actions.unsqueeze(-1)).squeeze(-1)
    return TopKPair(
        indices=idx,
        logp=logp,
        logq=logq,
        valid=valid,
        tail_p=_tail(logp, valid),
        tail_q=_tail(logq, valid),
        actions=actions,
        action_slot=action_slot,
        mask=mask_b,
        vocab_size=V,
        k=k,
    )

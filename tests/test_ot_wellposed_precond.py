"""The well-posed solver's preconditioner when the hub block is singular."""

from __future__ import annotations

import math

import torch

from wprctl.ot.wellposed import _Batch, _plan, _Precond


def test_singular_hub_block_drops_the_hub_correction_instead_of_raising() -> None:
    # Two positions, three slots, one in-support edge each way. In position 0 the dust
    # potentials are so low that every dust plan entry underflows to 0: its hub rows are zero
    # and the 4x4 Schur complement is singular.
    la = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.4, 0.1]], dtype=torch.float64))
    lb = torch.log(torch.tensor([[0.4, 0.3, 0.2], [0.3, 0.5, 0.1]], dtype=torch.float64))
    laD = torch.log(torch.tensor([0.1, 0.1], dtype=torch.float64))
    lbD = laD.clone()
    lam = torch.ones(2, 3, dtype=torch.float64)
    ep, ei, ej = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])
    edges = (ep, ei, ej, torch.full((4,), 0.5, dtype=torch.float64))
    bt = _Batch(la, lb, laD, lbD, lam, edges, math.log(2.0))
    F, G = la / 2, lb / 2
    H = torch.tensor([[-1e4, -1e4, -1e4, -1e4], [-1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    pl = _plan(bt, F, G, H, lam_r=3.0)
    assert torch.all(pl["rh"][0] == 0) and torch.all(pl["rh"][1] > 0)

    M = _Precond(bt, pl)  # torch.linalg.inv raised LinAlgError here

    assert torch.all(M.Hinv[0] == 0)
    assert torch.isfinite(M.Hinv[1]).all() and M.Hinv[1].abs().sum() > 0
    q = (torch.ones(2, 3, dtype=torch.float64),) * 2 + (torch.ones(2, 4, dtype=torch.float64),)
    zF, zG, zH = M.apply(*q)
    assert all(torch.isfinite(z).all() for z in (zF, zG, zH))
    # position 0 gets the slot blocks' inverse alone (no hub correction): z = B^-1 q per slot
    assert torch.all(zH[0] == 0)
    torch.testing.assert_close(zF[0], M.al[0] + M.be[0])
    torch.testing.assert_close(zG[0], M.be[0] + M.ga[0])

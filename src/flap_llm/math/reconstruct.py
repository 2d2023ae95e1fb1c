"""Structured OBS: which input units of an output projection to remove when the kept columns are refit by
least squares afterwards, and how to split a global budget over many projections (pure tensor math).

An output projection y = W x + b (W: [d_out, d]) sees inputs with covariance C over the calibration tokens.
Removing a set P of input columns and refitting the kept ones K and the bias optimally (`lsq_compensation`)
leaves the per-token mean squared output error

    E(P) = tr(W_P S W_P^T),   S = H_PP - H_PK H_KK^-1 H_KP = ((H^-1)_PP)^-1,   H = C + lambda I.

Removing one more unit u (its columns U) from the current kept set with the current refit weights W and
Q = H_KK^-1 costs tr(W_U (Q_UU)^-1 W_U^T); afterwards W <- W - W_U (Q_UU)^-1 Q_U,: and
Q <- Q - Q_:,U (Q_UU)^-1 Q_U,: (the structured OBS step). A sequence of such steps adds up to E(P) exactly,
so the path's error curve is the refit error of every prefix of its removal order.

The same refit can be scored on other tokens: with V the second moment of held-out inputs about the
calibration mean (the refit bias absorbs that mean), the held-out error of a prefix is tr(D V D^T), where
D = W' - W is the refit's total change (the removed columns' weights included). Each step changes D by
A = W_U X (X = (Q_UU)^-1 Q_U,:), so with G = D V kept up to date (G -= W_U (X V)) the error moves by
-2 <A, G> + tr(A V A^T), both read off |U|-row products: <A, G> = <X, W_U^T G> and
tr(A V A^T) = <W_U^T W_U, X V X^T>.

Both updates are kept pending over a group of steps (`_Pending`) and applied in one product each: the
inverse's as Q0 - R^T X, the held-out terms of the whole group from one X V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.apply import complement
from ..errors import FlapError


@dataclass(frozen=True)
class RemovalPath:
    """Units of one projection in the order they go, and the refit error after each prefix."""

    order: torch.Tensor  # [n_removed] LongTensor of unit indices, first removed first
    error: torch.Tensor  # [n_removed + 1] float64: error[k] = E(order[:k]), error[0] = 0
    held_out: torch.Tensor | None = None  # [n_removed + 1] float64: the same refits' error on held-out inputs


def damped(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """H = C + lambda I with lambda = damp * mean(diag C), in float64."""
    h = cov.to(torch.float64, copy=True)
    h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12))  # in place: no [d, d] identity
    return h


def refit_error(weight: torch.Tensor, h: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """E(P) computed directly from the Schur complement (the reference the path must reproduce)."""
    w = weight.to(torch.float64)
    k = complement(removed.cpu(), h.shape[0]).to(w.device)
    removed = removed.to(w.device)
    s = h[removed][:, removed]
    if k.numel():
        s = s - h[removed][:, k] @ torch.linalg.solve(h[k][:, k], h[k][:, removed])
    wp = w[:, removed]
    return (wp @ s * wp).sum()


def held_out_moment(cov: torch.Tensor, mean: torch.Tensor, fit_mean: torch.Tensor) -> torch.Tensor:
    """V = C + (mu - mu_fit)(mu - mu_fit)^T: held-out inputs' second moment about the calibration mean."""
    delta = (mean - fit_mean).to(torch.float64)
    return cov.to(torch.float64).addr(delta, delta)


def refit_change(weight: torch.Tensor, h: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """D = W' - W of the refit that removes the columns `removed` (W'_P = 0, W'_K = W H_:K H_KK^-1), solved
    directly (the reference for the path's held-out errors)."""
    w = weight.to(torch.float64)
    k = complement(removed.cpu(), h.shape[0]).to(w.device)
    new = torch.zeros_like(w)
    if k.numel():
        new[:, k] = torch.linalg.solve(h[k][:, k], (w @ h[:, k]).T).T
    return new - w


def _unit_scores(w: torch.Tensor, blocks: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """tr(W_U (Q_UU)^-1 W_U^T) of every unit; blocks: their Q_UU [n_units, s, s]; cols: [n_units, s] column
    indices into w."""
    if cols.shape[1] == 1:
        return w.square().sum(0)[cols[:, 0]] / blocks[:, 0, 0]
    w_u = w[:, cols].permute(1, 2, 0)  # [n, s, d_out]
    # Q_UU is positive definite: a batched Cholesky solve. (Not torch.linalg.solve: the CPU build's batched LU
    # fails, "Pivots given to lu_solve must all be greater or equal to 1", once torch.set_num_threads has been
    # called; tests/test_obs.py has the case.) A block rounding leaves indefinite is solved on its own.
    chol, info = torch.linalg.cholesky_ex(blocks)
    solved = torch.cholesky_solve(w_u, chol)
    for i in torch.nonzero(info).flatten().tolist():
        solved[i] = torch.linalg.solve(blocks[i], w_u[i])
    return (w_u * solved).sum((1, 2))


class _Pending:
    """The steps since the last flush, kept apart as a low-rank correction instead of applied one by one.

    The inverse after those steps is Q = Q0 - R^T X (R: the rows Q_U,: each step read, X: its
    (Q_UU)^-1 Q_U,:), so a step reads the current rows of its units as Q0_U,: - R_:,U^T X, and the whole
    correction is applied in one product at a flush: fewer passes over the [d, d] inverse, and a rank-r
    product instead of r/|U| thin ones. The held-out score of the same steps is also settled at a flush: it
    does not steer the path, and one product X V for all of them replaces a thin one per step.
    """

    def __init__(self, q0: torch.Tensor, d_out: int, capacity: int, held_out: torch.Tensor | None) -> None:
        d, dev, dtype = q0.shape[0], q0.device, q0.dtype
        self.q0, self.n, self.capacity = q0, 0, capacity
        self.r_t = torch.empty(d, capacity, dtype=dtype, device=dev)  # R^T: its rows are gathered
        self.x = torch.empty(capacity, d, dtype=dtype, device=dev)
        self.w = torch.empty(d_out, capacity, dtype=dtype, device=dev)  # each step's W_U, for the held-out score
        self.steps: list[tuple[int, torch.Tensor]] = []  # (rows, the step's shares of its cost) per step
        self.v = None if held_out is None else held_out.to(device=dev, dtype=torch.float32)  # V on live columns
        self.change_v = None if held_out is None else torch.zeros(d_out, d, dtype=torch.float32, device=dev)  # G = D V
        self.held = [torch.zeros((), dtype=torch.float64, device=dev)]

    def rows(self, c: torch.Tensor) -> torch.Tensor:
        """The current Q_c,: [|c|, d]."""
        if not self.n:
            return self.q0[c]
        return torch.addmm(self.q0[c], self.r_t[c, :self.n], self.x[:self.n], alpha=-1.0)

    def push(self, rows: torch.Tensor, x: torch.Tensor, w_c: torch.Tensor, share: torch.Tensor) -> None:
        k = rows.shape[0]
        self.r_t[:, self.n:self.n + k], self.x[self.n:self.n + k], self.w[:, self.n:self.n + k] = rows.T, x, w_c
        self.steps.append((k, share))
        self.n += k

    def flush(self, keep: torch.Tensor | None = None) -> None:
        """Apply the pending steps to Q0 (restricted to the columns `keep`, when compacting) and score them
        on the held-out inputs."""
        n, x = self.n, self.x[:self.n]
        if self.v is not None and n:
            self._score(x, self.w[:, :n])
        if keep is not None:
            self.q0 = self.q0[keep][:, keep]
            if n:
                self.q0.addmm_(self.r_t[keep, :n], x[:, keep], alpha=-1.0)
            if self.v is not None:
                self.v, self.change_v = self.v[keep][:, keep], self.change_v[:, keep]
            self.r_t, self.x = self.r_t[:keep.numel()], self.x[:, :keep.numel()]  # the buffers' memory, narrower
        elif n:
            self.q0.addmm_(self.r_t[:, :n], x, alpha=-1.0)
        self.n, self.steps = 0, []

    def _score(self, x: torch.Tensor, w: torch.Tensor) -> None:
        """Held-out errors of the pending steps. Step t changes D by A_t = W_t X_t, which moves tr(D V D^T) by
        -2 <A_t, G> + tr(A_t V A_t^T) with G = D V before it; G before step t is G at the flush less the
        earlier pending steps' A_s V, and every term is a block of (W^T W) * (X V X^T) or of (W^T G) * X."""
        x32, w32 = x.to(torch.float32), w.to(torch.float32)
        xv = x32 @ self.v  # [n, d]
        pair = (w.T @ w).double() * (xv @ x32.T).double()  # [n, n]: <W_i^T W_j, (X V X^T)_ij> per row pair
        first = ((w32.T @ self.change_v).double() * x).sum(1)  # [n]: <A_t, G at the flush>
        self.change_v.addmm_(w32, xv, alpha=-1.0)
        step = torch.repeat_interleave(torch.arange(len(self.steps), device=x.device),
                                       torch.tensor([k for k, _ in self.steps], device=x.device))
        k = len(self.steps)
        sums = torch.zeros(k, k, dtype=torch.float64, device=x.device)
        sums.index_put_((step[:, None].expand_as(pair), step[None, :].expand_as(pair)), pair, accumulate=True)
        cross = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, step, first)
        moved = sums.diagonal() - 2 * (cross - sums.tril(-1).sum(1))
        for t, (_, share) in enumerate(self.steps):
            self.held.extend((self.held[-1] + moved[t] * torch.cumsum(share, 0)).unbind())


def _pending_capacity(d: int, widest: int) -> int:
    """Columns of pending steps kept before a flush: a quarter of the positions die before each compaction
    (which flushes), so room for that and a step more; a fuller buffer is flushed without compacting."""
    return d // 4 + 2 * widest


def removal_path(weight: torch.Tensor, h: torch.Tensor, unit_size: int, n_remove: int, block: int = 1,
                 order: torch.Tensor | None = None, held_out: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float64) -> RemovalPath:
    """Remove `n_remove` units of `unit_size` adjacent columns greedily (or in the given `order`), each step
    taking the `block` units whose removal with the refit raises the output error least.

    weight: [d_out, d]; h: the damped input covariance [d, d] (`damped`). Steps of several units are exact
    for the units they take; within a step the error is spread linearly over its units (its own order is by
    single-unit cost). Works on a compacted copy in `dtype` (float32 is faster on wide layers; the curves
    stay float64 sums). held_out: V [d, d] (`held_out_moment`): also score every prefix's refit on
    those inputs (the path's `held_out` curve; float32 products).
    """
    d = h.shape[0]
    if unit_size < 1 or d % unit_size:
        raise FlapError(f"unit_size {unit_size} does not divide the projection's {d} input columns")
    n_units = d // unit_size
    if not 0 <= n_remove <= n_units:
        raise FlapError(f"cannot remove {n_remove} of {n_units} units")
    if order is not None and order.numel() < n_remove:
        raise FlapError(f"the given order has {order.numel()} units, fewer than the {n_remove} to remove")
    w = weight.detach().to(dtype).clone()
    # one [d, d] matrix at a time beside the next: a caller that passed its only reference to H (obs's paths
    # do) frees it here, and the factor goes once the inverse is made
    chol = torch.linalg.cholesky(h.to(dtype))
    del h
    q = torch.cholesky_inverse(chol)
    del chol
    dev = q.device
    unit = torch.arange(n_units, device=dev)  # the unit at each position of the (compacted) w and q
    alive = torch.ones(n_units, dtype=torch.bool, device=dev)  # per position
    offsets = torch.arange(unit_size, device=dev)
    every = unit[:, None] * unit_size + offsets  # [positions, unit_size]: each position's columns
    blocks = q[every[:, :, None], every[:, None, :]]  # [positions, s, s]: each unit's current Q_UU
    widest = min(block, n_remove) * unit_size  # columns one step removes at most
    pending = _Pending(q, w.shape[0], _pending_capacity(d, widest), held_out)
    # the pending steps hold Q (compacted as units go) and V in float32: these references may go
    scored, held_out, q = held_out is not None, None, None
    taken: list[int] = []
    errors = [torch.zeros((), dtype=torch.float64, device=dev)]
    while len(taken) < n_remove:
        b = min(block, n_remove - len(taken))
        if pending.n + b * unit_size > pending.capacity:
            pending.flush()
        pos = torch.nonzero(alive).flatten()
        scores = _unit_scores(w, blocks[pos], every[pos])
        if order is None:
            pick = torch.sort(scores, stable=True).indices[:b]
        else:
            want = order[len(taken):len(taken) + b].to(dev)
            pick = torch.stack([torch.nonzero(unit[pos] == u)[0, 0] for u in want])
        c = every[pos[pick]].flatten()
        q_c, w_c = pending.rows(c), w[:, c]  # [b*s, d], [d_out, b*s]
        q_cc = q_c[:, c]
        x = torch.linalg.solve(q_cc, q_c)  # (Q_UU)^-1 Q_U,:
        step = (w_c * torch.linalg.solve(q_cc, w_c.T).T).sum().double()
        w.addmm_(w_c, x, alpha=-1.0)
        if unit_size == 1:  # Q <- Q - Q_:,U X on the units' blocks (here its diagonal)
            blocks[:, 0, 0] -= (q_c * x).sum(0)
        else:
            blocks -= torch.einsum("kns,knt->nst", q_c[:, every], x[:, every])
        share = scores[pick].double().clamp_min(0)  # the step's cost spread over its units by their own costs
        share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / b)
        errors.extend((errors[-1] + step * torch.cumsum(share, 0)).unbind())
        pending.push(q_c, x, w_c, share)
        taken.extend(int(u) for u in unit[pos[pick]])
        alive[pos[pick]] = False
        if alive.sum() * 4 < alive.numel() * 3:  # compact once a quarter of the positions are dead
            keep = torch.nonzero(alive).flatten()
            kc = every[keep].flatten()
            pending.flush(kc)
            w, unit, blocks = w[:, kc], unit[keep], blocks[keep]
            alive = torch.ones(keep.numel(), dtype=torch.bool, device=dev)
            every = torch.arange(keep.numel(), device=dev)[:, None] * unit_size + offsets
    pending.flush()
    return RemovalPath(torch.tensor(taken, dtype=torch.long), torch.stack(errors).cpu(),
                       torch.stack(pending.held).cpu() if scored else None)


def _lower_hull(y: torch.Tensor) -> list[int]:
    """Indices of the lower convex hull of the points (k, y[k]), k = 0..n, from left to right."""
    pts: list[int] = []
    for k in range(y.numel()):
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b when it lies on or above the segment a -> k
            if (y[b] - y[a]) * (k - a) >= (y[k] - y[a]) * (b - a):
                pts.pop()
            else:
                break
        pts.append(k)
    return pts


def allocate(curves: list[torch.Tensor], costs: list[float], budget: float) -> list[int]:
    """How many units each curve gives up so that the removed cost stays within `budget` and the summed
    error is small: curves[m][k] is module m's error after removing k units, each costing costs[m].

    Greedy on the lower convex hulls: hull segments of all modules in order of error per unit cost (a
    module's segments come in its own order, since hull slopes increase); a segment that does not fit whole
    is taken as far as it fits, and later segments of other modules still fill what is left. Exact for
    convex curves with equal costs; otherwise within one segment of the optimum.
    """
    if len(curves) != len(costs):
        raise FlapError("allocate needs one cost per curve")
    segments = []
    for m, y in enumerate(curves):
        y = y.to(torch.float64)
        hull = _lower_hull(y)
        for a, b in zip(hull, hull[1:]):
            segments.append((float(y[b] - y[a]) / ((b - a) * costs[m]), m, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    removed = [0] * len(curves)
    closed = [False] * len(curves)
    left = budget * (1 + 1e-12)
    for _, m, a, b in segments:
        if closed[m] or removed[m] != a:
            continue
        take = min(b - a, int(left // costs[m] + 1e-9))
        if take <= 0:
            closed[m] = True
            continue
        removed[m] += take
        left -= take * costs[m]
        if take < b - a:
            closed[m] = True
    return removed

"""
Routers for Mixture-of-Recursions (MoR): which tokens run which recursion step.

model.py applies one shared block R times. Before step r, a router picks the
tokens that take part; the rest keep their hidden state and skip the step. Two
routers from the paper (section 2.2):

Expert-choice: each step is an "expert" that chooses its tokens. Step r keeps the
  top-k tokens of each sequence by a learned score, k = capacity_r * T, with the
  default schedule capacity_r = (R - r) / R (1, 2/3, 1/3 for R = 3). Selection is
  hierarchical: only tokens kept at step r-1 are candidates at step r, so a token's
  depth is the number of steps it survived. Compute per step is fixed and known.
  Trouble: top-k over a sequence looks at future tokens, which a decoder cannot do
  at inference. The fix (paper's "auxiliary loss"): a BCE loss trains each router
  logit towards the 0/1 top-k decision, so at inference a token continues when
  sigmoid(logit) > 0.5, a decision that needs only the token itself. The
  alternative ("auxiliary router") trains a separate small router on detached
  inputs to predict the top-k choice and lets it decide at inference.

Token-choice: each token chooses its depth once, before the first step: a router
  gives a softmax over the R depths and the token takes the top-1. Causal by
  construction, but nothing forces balance: an auxiliary balancing loss (or a
  loss-free per-depth bias) keeps all depths in use.

Both routers gate: a token that runs step r updates h <- h + g * (block(h) - h),
with g the router's score. The score is what gives the router a gradient.

This file also holds ActiveSet, the bookkeeping of depth-wise batching: the
packed list of tokens that run a step. Tokens outside it get no compute at all.
"""
import csv
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Depth-wise batching: the tokens that run one step, packed

@dataclass
class ActiveSet:
    """The tokens of one forward call ([B, T] tokens, flattened) that run a step.

    Tokens are listed row by row, in position order, so causal order survives
    packing. Attention (kv_cache.py) lays them out as a grid of the rows that have
    any active token, K slots wide.
    """
    flat: torch.Tensor       # [N] index into the call's B*T tokens (gather/scatter index)
    b: torch.Tensor          # [N] batch row of each token
    s: torch.Tensor          # [N] rank of the token among its row's active tokens
    pos: torch.Tensor        # [N] absolute position (RoPE angle, causal masks)
    rows: torch.Tensor       # [n_rows] batch rows with at least one active token
    counts: torch.Tensor     # [n_rows] active tokens in each of those rows
    qpos: torch.Tensor       # [n_rows, K] position at each grid slot (pads: a huge position)
    slot: torch.Tensor       # [N] flat grid index of each token (None when the grid is full;
                             #     else a row's tokens fill its first slots, pads come last)
    B: int
    T: int
    K: int                   # grid width: the most active tokens in any row
    all_rows: bool           # rows == every batch row, in order
    start: int               # position of the call's first token (tokens already in the cache)

    @property
    def n(self):
        return self.flat.numel()

    @property
    def n_rows(self):
        return self.rows.numel()

    @staticmethod
    def everyone(B, T, start, device):
        """All B*T tokens: vanilla layers, unshared layers, and steps with capacity 1."""
        flat = torch.arange(B * T, device=device)
        pos = start + flat % T
        return ActiveSet(flat, flat // T, flat % T, pos, torch.arange(B, device=device),
                         torch.full((B,), T, device=device), pos.view(B, T), None, B, T, T, True, start)

    @staticmethod
    def from_topk(local, B, T, start):
        """Expert-choice top-k: local [B, k] positions inside the call, sorted. Same k per row."""
        k = local.shape[1]
        rows = torch.arange(B, device=local.device)
        flat = (rows[:, None] * T + local).view(-1)
        pos = start + local
        return ActiveSet(flat, rows.repeat_interleave(k), torch.arange(k, device=local.device).repeat(B),
                         pos.view(-1), rows, torch.full((B,), k, device=local.device), pos, None,
                         B, T, k, True, start)

    @staticmethod
    def from_mask(mask, start):
        """Any subset: mask [B, T] bool. Rows may keep different counts (ragged)."""
        B, T = mask.shape
        dev = mask.device
        per_row = mask.sum(1)                                    # [B]
        rows = per_row.nonzero().squeeze(1)                      # rows with any active token
        flat = mask.view(-1).nonzero().squeeze(1)                # row-major: causal order kept
        n_rows, N = rows.numel(), flat.numel()
        K = int(per_row.max()) if N else 0
        b, t = flat // T, flat % T
        s = torch.arange(N, device=dev) - (per_row.cumsum(0) - per_row)[b]   # rank inside the row
        grid_row = torch.zeros(B, dtype=torch.long, device=dev)
        grid_row[rows] = torch.arange(n_rows, device=dev)
        slot = grid_row[b] * K + s
        counts = per_row[rows]
        full = N == n_rows * K
        qpos = torch.full((n_rows * K,), 2**40, dtype=torch.long, device=dev)  # pads: after everything
        qpos = qpos.index_copy(0, slot, start + t).view(n_rows, K)
        return ActiveSet(flat, b, s, start + t, rows, counts, qpos, None if full else slot,
                         B, T, K, n_rows == B, start)

    @staticmethod
    def one_per_row(rows, pos):
        """One token for each of `rows` (cache rows), at positions pos [n]: continuous batching,
        where every item of a call comes from its own sequence (and recursion step)."""
        n, dev = rows.numel(), rows.device
        ones = torch.ones(n, dtype=torch.long, device=dev)
        return ActiveSet(rows, rows, torch.zeros_like(rows), pos, rows, ones, pos[:, None], None,
                         n, 1, 1, False, -1)

    def subset(self, keep):
        """The tokens of this set where keep [N] is True (hierarchical selection)."""
        mask = torch.zeros(self.B * self.T, dtype=torch.bool, device=keep.device)
        mask[self.flat[keep]] = True
        return ActiveSet.from_mask(mask.view(self.B, self.T), self.start)


# -----------------------------------------------------------------------------
# The router networks

class RouterNet(nn.Module):
    """h [N, d] -> logits [N, n_out]. A bias-free linear map, or a small MLP."""
    def __init__(self, n_embd, n_out, arch="linear"):
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(n_embd, n_out, bias=False)
        elif arch == "mlp":
            self.net = nn.Sequential(nn.Linear(n_embd, n_embd // 2, bias=False), nn.GELU(),
                                     nn.Linear(n_embd // 2, n_out, bias=False))
        else:
            raise ValueError(f"router_arch must be 'linear' or 'mlp', got {arch!r}")

    def forward(self, h):
        return self.net(h)


class ExpertChoiceRouter(nn.Module):
    """One router per recursion step; step r keeps the top capacity_r * T tokens."""

    def __init__(self, cfg, n_recursion):
        super().__init__()
        self.R = n_recursion
        self.capacity = cfg.capacity_schedule(n_recursion)
        self.nets = nn.ModuleList(RouterNet(cfg.n_embd, 1, cfg.router_arch) for _ in range(self.R))
        # the auxiliary router: its own weights, trained on detached inputs, decides at inference.
        # Steps with capacity 1 choose nothing, so they need none.
        self.aux_nets = (nn.ModuleDict({str(r): RouterNet(cfg.n_embd, 1, "mlp")
                                        for r in range(self.R) if self.capacity[r] < 1.0})
                         if cfg.router_aux == "router" else None)
        self.cfg = cfg

    def gate(self, logit):
        """Score g in (0, alpha): sigmoid (the paper's choice) or tanh."""
        z = logit / self.cfg.router_temperature
        return self.cfg.router_alpha * (torch.sigmoid(z) if self.cfg.router_fn == "sigmoid" else torch.tanh(z))

    def decide(self, r, h, lanes=None, pos=None, memo=None):
        """The causal rule for tokens about to enter step r, h [N, d] -> (keep [N] bool, gate [N]).

        A token continues when sigmoid(logit) > 0.5, i.e. logit > 0 (or the aux router's
        logit): it reads only the token itself, so no future token can change it.
        (lanes, pos, memo: unused here; token-choice and forced depths need them.)
        """
        logit = self.nets[r](h).squeeze(-1)
        gate = self.gate(logit)
        if self.capacity[r] >= 1.0:                              # nothing to choose: everyone runs
            return torch.ones_like(logit, dtype=torch.bool), gate
        decide = self.aux_nets[str(r)](h).squeeze(-1) if self.aux_nets is not None else logit
        return decide > 0, gate

    def route(self, r, h, prev, state, rule):
        """Pick the tokens that run step r among prev (the tokens that ran step r-1).

        h: [B*T, d] hidden states of the call; prev: ActiveSet; rule: 'topk' or 'causal'.
        Returns (ActiveSet of the chosen tokens, gate [N] for each of them).
        """
        cfg, B, T = self.cfg, prev.B, prev.T
        h_cand = h if prev.n == B * T else h[prev.flat]          # router sees candidates only
        if rule == "causal" or self.capacity[r] >= 1.0:
            keep, gate = self.decide(r, h_cand)
            act = prev if self.capacity[r] >= 1.0 else prev.subset(keep)
            state.log_step(r, act.n, B * T)
            return act, (gate if act is prev else gate[keep])

        # Training: exactly k = capacity_r * T tokens per sequence. Candidates fill a
        # full [B, Kc] grid because every row kept the same count at step r-1.
        assert prev.slot is None and prev.all_rows, "top-k routing needs full rows; use rule='causal'"
        logit = self.nets[r](h_cand).squeeze(-1)                 # [Nc]
        k, Kc = max(1, int(self.capacity[r] * T)), prev.K
        top = logit.view(B, Kc).topk(min(k, Kc), dim=1).indices.sort(dim=1).values   # keep causal order
        chosen = prev.flat.view(B, Kc).gather(1, top)                                  # [B, k] in the call
        act = ActiveSet.from_topk(chosen % T, B, T, prev.start)
        gate = self.gate(logit).view(B, Kc).gather(1, top).view(-1)
        # Auxiliary loss: train the deciding logit towards the top-k decision, so that
        # sigmoid(logit) > 0.5 reproduces it causally at inference.
        decide = self.aux_nets[str(r)](h_cand.detach()).squeeze(-1) if self.aux_nets is not None else logit
        target = torch.zeros_like(logit).view(B, Kc).scatter(1, top, 1.0).view(-1)
        state.add_loss("aux", cfg.router_aux_weight, F.binary_cross_entropy_with_logits(decide.float(), target.float()))
        state.add_stat(f"agree{r}", ((decide > 0).float() == target).float().mean())
        if cfg.router_z_weight > 0:  # one logit per token: its logsumexp is the logit itself
            state.add_loss("z", cfg.router_z_weight, logit.float().pow(2).mean())
        state.log_step(r, act.n, B * T)
        return act, gate


class _DepthFirst(nn.Module):
    """Routers that fix each token's depth before the first step (token-choice, forced).
    Subclasses give assign(h, b, pos) -> (depth [N] in 1..R, gate at the last step [N] or None)."""

    def route(self, r, h, prev, state, rule):
        B, T = prev.B, prev.T
        if r == 0:
            state.tc = self.assign(h, prev.b, prev.pos, state)
        depth, p = state.tc
        act = prev if r == 0 else ActiveSet.from_mask((depth > r).view(B, T), prev.start)
        state.log_step(r, act.n, B * T)
        if p is None:
            return act, None
        # the output at a token's last step is gated by the probability of its choice
        d, p = (depth, p) if act.n == B * T else (depth[act.flat], p[act.flat])
        return act, torch.where(d == r + 1, p.to(h.dtype), 1.0)

    def decide(self, r, h, lanes, pos, memo):
        """Continuous batching: the same rule per token; memo keeps each lane's choice."""
        if r == 0:
            d, p = self.assign(h, lanes, pos, RouteState())
            memo["depth"][lanes] = d
            if p is not None:
                memo["p"][lanes] = p.float()
        d = memo["depth"][lanes]
        gate = None if self.forced else torch.where(d == r + 1, memo["p"][lanes].to(h.dtype), 1.0)
        return d > r, gate


class TokenChoiceRouter(_DepthFirst):
    """One router before the first step: each token picks its depth 1..R."""
    forced = False

    def __init__(self, cfg, n_recursion):
        super().__init__()
        self.R = n_recursion
        self.net = RouterNet(cfg.n_embd, n_recursion, cfg.router_arch)
        # loss-free balancing: a per-depth bias added for the choice only (never to the gate)
        self.register_buffer("bias", torch.zeros(n_recursion), persistent=True)
        self.cfg = cfg

    def assign(self, h, b, pos, state):
        cfg = self.cfg
        logit = self.net(h).float() / cfg.router_temperature      # [N, R]
        prob = logit.softmax(-1)
        score = prob + self.bias if cfg.balancing == "loss_free" else prob
        choice = score.argmax(-1)                                  # depth - 1
        load = torch.bincount(choice, minlength=self.R).float() / choice.numel()   # f_i
        state.add_stat("load", load)
        if self.training:
            if cfg.balancing == "loss":   # Switch-style: R * sum_i f_i * P_i
                state.add_loss("balance", cfg.router_balance_weight, self.R * (load * prob.mean(0)).sum())
            if cfg.router_z_weight > 0:
                state.add_loss("z", cfg.router_z_weight, torch.logsumexp(logit, -1).pow(2).mean())
            if cfg.router_entropy_weight != 0:  # weight > 0 rewards spread-out (exploring) choices
                entropy = -(prob * prob.clamp_min(1e-9).log()).sum(-1).mean()
                state.add_loss("entropy", -cfg.router_entropy_weight, entropy)
            if cfg.target_depth > 0:  # pull the expected depth towards a compute budget
                expected = (prob * torch.arange(1, self.R + 1, device=h.device)).sum(-1).mean()
                state.add_loss("depth", cfg.target_depth_weight, (expected - cfg.target_depth) ** 2)
        return choice + 1, prob.gather(1, choice[:, None]).squeeze(1)

    @torch.no_grad()
    def update_bias(self, load):
        """Loss-free balancing, after each optimizer step: bias_i += u * sign(mean load - load_i)."""
        self.bias += self.cfg.balance_bias_rate * torch.sign(load.mean() - load)


class ForcedDepthRouter(_DepthFirst):
    """Benchmarks only: each token's depth is a fixed hash of (row, position), drawn from
    `probs` (probabilities of depths 1..R). Throughput at a chosen depth distribution,
    independent of (untrained) router weights; no gates."""
    forced = True

    def __init__(self, probs):
        super().__init__()
        self.R = len(probs)
        self.register_buffer("cum", torch.tensor(probs, dtype=torch.float64).cumsum(0), persistent=False)

    def assign(self, h, b, pos, state):
        u = ((pos * 2654435761 + b * 40503 + 12345) % 2**32).double() / 2**32   # uniform-ish in [0, 1)
        depth = torch.searchsorted(self.cum.to(u.device), u, right=True).clamp(max=self.R - 1) + 1
        return depth, None


class RouteState:
    """Per-forward scratch: router losses, statistics, token-choice assignments."""
    def __init__(self):
        self.losses = {}   # name -> (weight, value)
        self.stats = {}    # name -> tensor (no grad)
        self.tc = None

    def add_loss(self, name, weight, value):
        w0, v0 = self.losses.get(name, (weight, 0.0))
        self.losses[name] = (weight, v0 + value)

    def add_stat(self, name, value):
        self.stats[name] = value.detach()

    def log_step(self, r, n, total):
        self.stats[f"frac{r}"] = torch.tensor(n / total)

    def total_loss(self):
        return sum(w * v for w, v in self.losses.values() if w != 0)


# -----------------------------------------------------------------------------
# Depth statistics: one summary shared by the native model (model.py) and the HF
# adapter (hf_wrap.py), so sample.py prints and saves both the same way.

def depth_summary(depths, layers_per_depth):
    """Summarize per-token depths.

    depths: 1-D int tensor or list, each token's depth in 0..D.
    layers_per_depth: list of D+1 ints, the layer calls a token of depth d costs
        (e.g. prelude + d * block_size + coda). The last entry is full depth.
    Returns a plain dict (JSON/CSV friendly).
    """
    depths = torch.as_tensor(depths, dtype=torch.long).flatten().cpu()
    max_depth = len(layers_per_depth) - 1
    if depths.numel() and (depths.min() < 0 or depths.max() > max_depth):
        raise ValueError(f"depths must lie in 0..{max_depth}, got {depths.min()}..{depths.max()}")
    hist = torch.bincount(depths, minlength=max_depth + 1).tolist()
    cost = torch.tensor(layers_per_depth, dtype=torch.long)
    calls = int((torch.tensor(hist) * cost).sum())
    full = depths.numel() * int(cost[-1])
    return {
        "tokens": depths.numel(),
        "depth_hist": hist,                       # hist[d] = tokens that ran d steps
        "mean_depth": float(depths.float().mean()) if depths.numel() else 0.0,
        "layer_calls": calls,                     # layer applications actually executed
        "layer_calls_full": full,                 # what full depth would have cost
        "compute_saved_pct": 100.0 * (1 - calls / full) if full else 0.0,
    }


def write_depth_csv(summary, path):
    """One row per depth: depth, tokens, fraction."""
    hist, n = summary["depth_hist"], max(1, summary["tokens"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["depth", "tokens", "fraction"])
        for d, c in enumerate(hist):
            w.writerow([d, c, f"{c / n:.6f}"])

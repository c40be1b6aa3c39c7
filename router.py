"""
Routers for Mixture-of-Recursions: which tokens run which recursion step.

Before step r, model.py hands the router the *candidates* (the tokens that ran step
r-1; everyone at r = 0) and asks which of them run step r. Every router answers through
one call, the same in training, generation and continuous batching:

    route = router(r, h, candidates, state, rule)
        h           [N, d]  the candidates' hidden states
        candidates  the model.ActiveSet they form (rows, positions, grid shape)
        state       a RouteState: this forward's losses, statistics and per-token choices
        rule        'topk' (training) or 'causal' (generation): see expert-choice below
    route.keep      [N] bool, the candidates that run step r (None: all of them)
    route.gate      [N] the gate g of each candidate (None: ungated)
    route.per_row   expert-choice top-k only: every row keeps exactly this many

A token that stops never comes back. Two routers from the paper (section 2.2):

Expert-choice: each step is an "expert" that picks its tokens: the top-k of each
  sequence by a learned score, k = capacity_r * T, by default capacity_r = (R - r) / R
  (1, 2/3, 1/3 for R = 3). Compute per step is fixed and known. Trouble: top-k over a
  sequence looks at future tokens, which a decoder cannot do at inference. The fix (the
  paper's "auxiliary loss"): BCE trains each router logit towards the 0/1 top-k
  decision, so at inference a token continues when sigmoid(logit) > 0.5, which needs
  only the token itself. The alternative ("auxiliary router"): a separate small router,
  trained on detached inputs, predicts the choice and decides at inference.

Token-choice: each token picks its depth once, before the first step: the top-1 of a
  softmax over the R depths. Causal by construction, but nothing forces balance: a
  balancing loss (or a loss-free per-depth bias) keeps all depths in use.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Route(NamedTuple):
    """A router's answer for one step (the module docstring)."""
    keep: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]
    per_row: Optional[int] = None  # lets model.py pack with no host sync


class RouteState:
    """What one forward pass (or continuous-batching run) remembers about routing.
    losses: name -> (weight, value), added to the LM loss in training.
    stats:  name -> detached tensor, for logs (fraction per step, agreement, load, entropy).
    depth, prob: [n_tokens] token-choice's depth per token and its probability."""

    def __init__(self, n_tokens=0):
        self.n_tokens = n_tokens
        self.losses = {}
        self.stats = {}
        self.depth = self.prob = None

    def add_loss(self, name, weight, value):
        _, v0 = self.losses.get(name, (weight, 0.0))
        self.losses[name] = (weight, v0 + value)

    def add_stat(self, name, value):
        self.stats[name] = value.detach()

    def log_step(self, r, n, total):
        self.stats[f"frac{r}"] = torch.tensor(n / total)

    def total_loss(self):
        return sum(w * v for w, v in self.losses.values() if w != 0)


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


# -----------------------------------------------------------------------------
# Expert-choice

class ExpertChoiceRouter(nn.Module):
    """One router per recursion step: step r keeps its top capacity_r * T tokens."""
    gated = True

    def __init__(self, cfg, n_recursion):
        super().__init__()
        self.R = n_recursion
        self.capacity = cfg.capacity_schedule(n_recursion)
        self.nets = nn.ModuleList(RouterNet(cfg.n_embd, 1, cfg.router_arch) for _ in range(self.R))
        # the auxiliary router (its own weights, detached inputs) decides at inference;
        # steps with capacity 1 choose nothing and need none
        self.aux_nets = (nn.ModuleDict({str(r): RouterNet(cfg.n_embd, 1, "mlp")
                                        for r in range(self.R) if self.capacity[r] < 1.0})
                         if cfg.router_aux == "router" else None)
        self.cfg = cfg

    def gate(self, logit):
        """g = alpha * sigmoid(logit / temperature) (the paper's), or alpha * tanh."""
        z = logit / self.cfg.router_temperature
        return self.cfg.router_alpha * (torch.sigmoid(z) if self.cfg.router_fn == "sigmoid" else torch.tanh(z))

    def forward(self, r, h, candidates, state, rule):
        cfg = self.cfg
        logit = self.nets[r](h).squeeze(-1)  # [N]
        gate = self.gate(logit)
        if self.capacity[r] >= 1.0:          # nothing to choose: everyone runs
            return Route(None, gate)
        if rule == "causal":  # continue when sigmoid(logit) > 0.5: the token alone decides
            decide = self.aux_nets[str(r)](h).squeeze(-1) if self.aux_nets is not None else logit
            return Route(decide > 0, gate)
        # training: top-k per sequence; the candidates fill a full [B, Kc] grid
        B, Kc = candidates.B, candidates.K
        k = min(Kc, max(1, int(self.capacity[r] * candidates.T)))
        top = logit.view(B, Kc).topk(k, dim=1).indices
        keep = torch.zeros(B, Kc, dtype=torch.bool, device=h.device).scatter(1, top, True).view(-1)
        # auxiliary loss: the deciding logit learns the top-k decision, for the causal rule
        decide = self.aux_nets[str(r)](h.detach()).squeeze(-1) if self.aux_nets is not None else logit
        target = keep.to(logit.dtype)
        bce = F.binary_cross_entropy_with_logits(decide.float(), target.float())
        state.add_loss("aux", cfg.router_aux_weight, bce)
        state.add_stat(f"agree{r}", ((decide > 0) == keep).float().mean())
        if cfg.router_z_weight > 0:  # one logit per token: its logsumexp is the logit itself
            state.add_loss("z", cfg.router_z_weight, logit.float().pow(2).mean())
        return Route(keep, gate, k)


# -----------------------------------------------------------------------------
# Token-choice (and any router that fixes a token's whole depth up front)

class DepthFirstRouter(nn.Module):
    """Routers that fix each token's depth before the first step. A subclass gives
    assign(h, candidates, state) -> (depth [N] in 1..R, its probability [N] or None) and
    sets `gated`: whether the last step's output is gated by that probability."""
    gated = True

    def forward(self, r, h, candidates, state, rule):
        ids = candidates.flat
        if r == 0:
            if state.depth is None:
                state.depth = torch.zeros(state.n_tokens, dtype=torch.long, device=h.device)
                state.prob = torch.ones(state.n_tokens, device=h.device)
            depth, prob = self.assign(h, candidates, state)
            state.depth[ids] = depth
            if prob is not None:
                state.prob[ids] = prob.float()
        depth = state.depth[ids]
        keep = None if r == 0 else depth > r  # every token runs step 0
        if not self.gated:
            return Route(keep, None)
        # a token's last step is gated by the probability of its choice
        return Route(keep, torch.where(depth == r + 1, state.prob[ids].to(h.dtype), 1.0))


class TokenChoiceRouter(DepthFirstRouter):
    """One router before the first step: each token picks its depth 1..R."""

    def __init__(self, cfg, n_recursion):
        super().__init__()
        self.R = n_recursion
        self.net = RouterNet(cfg.n_embd, n_recursion, cfg.router_arch)
        # loss-free balancing: a per-depth bias added for the choice only (never to the gate)
        self.register_buffer("bias", torch.zeros(n_recursion), persistent=True)
        self.cfg = cfg

    def assign(self, h, candidates, state):
        cfg = self.cfg
        logit = self.net(h).float() / cfg.router_temperature  # [N, R]
        prob = logit.softmax(-1)
        score = prob + self.bias if cfg.balancing == "loss_free" else prob
        choice = score.argmax(-1)  # depth - 1
        load = torch.bincount(choice, minlength=self.R).float() / choice.numel()  # f_i
        state.add_stat("load", load)
        if self.training:
            entropy = -(prob * prob.clamp_min(1e-9).log()).sum(-1).mean()
            state.add_stat("entropy", entropy)
            if cfg.balancing == "loss":  # Switch-style: R * sum_i f_i * P_i
                state.add_loss("balance", cfg.router_balance_weight, self.R * (load * prob.mean(0)).sum())
            if cfg.router_z_weight > 0:
                state.add_loss("z", cfg.router_z_weight, torch.logsumexp(logit, -1).pow(2).mean())
            if cfg.router_entropy_weight != 0:  # weight > 0 rewards spread-out (exploring) choices
                state.add_loss("entropy", -cfg.router_entropy_weight, entropy)
            if cfg.target_depth > 0:  # pull the expected depth towards a compute budget
                expected = (prob * torch.arange(1, self.R + 1, device=h.device)).sum(-1).mean()
                state.add_loss("depth", cfg.target_depth_weight, (expected - cfg.target_depth) ** 2)
        return choice + 1, prob.gather(1, choice[:, None]).squeeze(1)

    @torch.no_grad()
    def update_bias(self, load):
        """Loss-free balancing, after each optimizer step: bias_i += u * sign(mean(load) - load_i)."""

        self.bias += self.cfg.balance_bias_rate * torch.sign(load.mean() - load)


# -----------------------------------------------------------------------------
# Depth statistics, shared by model.py and hf_wrap.py so that sample.py reports both alike


def depth_summary(depths, layers_per_depth):
    """Summarize per-token depths (each in 0..D) as a plain dict (JSON/CSV friendly).
    layers_per_depth: D+1 ints, the layer calls a token of depth d costs (e.g. prelude +
    d * block_size + coda); the last is full depth."""

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
        "depth_hist": hist,        # hist[d] = tokens that ran d steps
        "mean_depth": float(depths.float().mean()) if depths.numel() else 0.0,
        "layer_calls": calls,      # layer applications actually executed
        "layer_calls_full": full,  # what full depth would have cost
        "compute_saved_pct": 100.0 * (1 - calls / full) if full else 0.0,
    }

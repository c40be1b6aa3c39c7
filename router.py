"""
Routers for Mixture-of-Recursions: which tokens run which recursion step.

model.py applies one shared block R times. Before step r it hands the router the
*candidates* (the tokens that ran step r-1; everyone at r = 0) and asks one question:
which of them run step r? Every router answers through one call, used the same way in
training, in generation and in continuous depth-wise batching:

    route = router(r, h, candidates, state, rule)
        h           [N, d]  the candidates' hidden states
        candidates  the model.ActiveSet they form (rows, positions, grid shape)
        state       a RouteState: this forward's losses, statistics and per-token choices
        rule        'topk' (training) or 'causal' (generation): see expert-choice below
    route.keep      [N] bool, the candidates that run step r (None: all of them)
    route.gate      [N] the gate g of each candidate (None: ungated)
    route.per_row   expert-choice top-k only: every row keeps exactly this many

A token that runs step r is updated h <- h + g * f(h) (model.py explains the gate). A
token that does not keep its hidden state and never comes back: its *depth* is the
number of steps it ran. Two routers from the paper (section 2.2):

Expert-choice: each step is an "expert" that chooses its tokens. Step r keeps the top-k
  tokens of each sequence by a learned score, k = capacity_r * T, with the default
  schedule capacity_r = (R - r) / R (1, 2/3, 1/3 for R = 3). Selection is hierarchical:
  only tokens kept at step r-1 are candidates at step r. Compute per step is fixed and
  known. Trouble: top-k over a sequence looks at future tokens, which a decoder cannot
  do at inference. The fix (the paper's "auxiliary loss"): a BCE loss trains each
  router logit towards the 0/1 top-k decision, so that at inference a token continues
  when sigmoid(logit) > 0.5, a decision that needs only the token itself. The
  alternative ("auxiliary router") trains a separate small router on detached inputs
  to predict the top-k choice, and lets it decide at inference.

Token-choice: each token chooses its depth once, before the first step: a router gives
  a softmax over the R depths and the token takes the top-1. Causal by construction,
  but nothing forces balance: an auxiliary balancing loss (or a loss-free per-depth
  bias) keeps all depths in use.
"""
import csv
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Route(NamedTuple):
    """A router's answer for one step (see the module docstring)."""
    keep: Optional[torch.Tensor]   # [N] bool over the candidates; None = every candidate runs
    gate: Optional[torch.Tensor]   # [N] gate per candidate; None = ungated (h <- block(h))
    per_row: Optional[int] = None  # top-k: each row keeps exactly this many (model.py packs with no host sync)


class RouteState:
    """What one forward pass (or one continuous-batching run) remembers about routing.

    losses: name -> (weight, value), added to the LM loss in training.
    stats:  name -> detached tensor, for logs (fraction per step, agreement, load, entropy).
    depth, prob: [n_tokens] the depth each token chose and its probability, for routers
      that decide the whole depth at step 0 (token-choice). Indexed by model.ActiveSet.flat.
    """
    def __init__(self, n_tokens=0):
        self.n_tokens = n_tokens
        self.losses = {}
        self.stats = {}
        self.depth = self.prob = None

    def add_loss(self, name, weight, value):
        w0, v0 = self.losses.get(name, (weight, 0.0))
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
    """One router per recursion step; step r keeps the top capacity_r * T tokens."""
    gated = True

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
        """g = alpha * sigmoid(logit / temperature) in (0, alpha), the paper's choice, or alpha * tanh."""
        z = logit / self.cfg.router_temperature
        return self.cfg.router_alpha * (torch.sigmoid(z) if self.cfg.router_fn == "sigmoid" else torch.tanh(z))

    def forward(self, r, h, candidates, state, rule):
        cfg = self.cfg
        logit = self.nets[r](h).squeeze(-1)                      # [N]
        gate = self.gate(logit)
        if self.capacity[r] >= 1.0:                              # nothing to choose: everyone runs
            return Route(None, gate)
        if rule == "causal":
            # A token continues when sigmoid(logit) > 0.5, i.e. logit > 0 (or the aux router's
            # logit): it reads only the token itself, so no future token can change it.
            decide = self.aux_nets[str(r)](h).squeeze(-1) if self.aux_nets is not None else logit
            return Route(decide > 0, gate)

        # Training: exactly k = capacity_r * T tokens per sequence. The candidates fill a
        # full [B, Kc] grid, because every row kept the same count at step r-1.
        B, Kc = candidates.B, candidates.K
        k = min(Kc, max(1, int(self.capacity[r] * candidates.T)))
        top = logit.view(B, Kc).topk(k, dim=1).indices
        keep = torch.zeros(B, Kc, dtype=torch.bool, device=h.device).scatter(1, top, True).view(-1)
        # Auxiliary loss: train the deciding logit towards the top-k decision, so that
        # sigmoid(logit) > 0.5 reproduces it causally at inference.
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
    assign(h, candidates, state) -> (depth [N] in 1..R, probability of that choice [N]
    or None), and says whether the last step's output is gated by that probability."""
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
        keep = None if r == 0 else depth > r                     # every token runs step 0
        if not self.gated:
            return Route(keep, None)
        # the output of a token's last step is gated by the probability of its choice
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
        logit = self.net(h).float() / cfg.router_temperature      # [N, R]
        prob = logit.softmax(-1)
        score = prob + self.bias if cfg.balancing == "loss_free" else prob
        choice = score.argmax(-1)                                  # depth - 1
        load = torch.bincount(choice, minlength=self.R).float() / choice.numel()   # f_i
        state.add_stat("load", load)
        if self.training:
            entropy = -(prob * prob.clamp_min(1e-9).log()).sum(-1).mean()
            state.add_stat("entropy", entropy)
            if cfg.balancing == "loss":   # Switch-style: R * sum_i f_i * P_i
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
        """Loss-free balancing, after each optimizer step: bias_i += u * sign(mean load - load_i)."""
        self.bias += self.cfg.balance_bias_rate * torch.sign(load.mean() - load)


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


# -----------------------------------------------------------------------------
# Routers for a frozen pretrained model (hf_wrap.py runs them, tune.py trains them)
#
# A pretrained Llama-family stack is not one shared block, but the same two questions
# apply layer by layer: does a token stop here, and does it run this layer? The routed
# layers are cut into *units* (runs of layers under one decision). Four kinds:
#
#   skip           a gate per unit: run the unit, or pass over it unchanged (MindSkip);
#   ffn            a gate per unit over the MLPs only: attention always runs, so every
#                  token's K/V stay exact (FlexiDepth-style capacity on the MLP);
#   expert_choice  a gate per unit = a group: stay or exit for good (MoR's expert-choice,
#                  hierarchical; its top-k is made causal by a calibrated cutoff);
#   token_choice   one router before the first unit picks a depth 0..U (MoR's token-choice).
#
# Training blends instead of deciding (the base is frozen, only the gates learn): unit u's
# update is scaled by a continue weight w_u in [0, 1], x <- x + w_u * (unit(x) - x) (ffn:
# the MLP's update only). The kinds differ only in how w_u comes from the gate logits z:
#   skip, ffn:      w_u = sigmoid(z_u)                     independent per unit
#   expert_choice:  w_u = w_{u-1} * sigmoid(z_u)           once out, out for good
#   token_choice:   w_u = P(depth > u) = 1 - cumsum(softmax(z))[u]
# Inference makes the 0/1 decision those weights stand for, with one knob, `bias`: a gate
# passes when z_u > bias, and token-choice takes argmax_d (z_d - bias * d). bias = 0 is the
# decision training ended on; a larger bias runs fewer layers.

ROUTER_KINDS = ("skip", "ffn", "expert_choice", "token_choice")
GATE_INIT_LOGIT = 3.0     # a new gate starts at sigmoid(3) = 0.95: the untrained routers are nearly the full model
EXIT_INIT_LOGIT = -3.0    # a new exit gate starts at 0.05: nobody exits until it is trained


class Gate(nn.Module):
    """One decision point: hidden state (..., C) -> logits (..., n_out), float32. The input is
    RMS-normalized without weights (pretrained residual streams carry a few huge channels);
    then a small MLP, or a linear map (mlp_hidden=0). bias_init: zero weights and this bias,
    so every token starts at sigmoid(bias_init)."""

    def __init__(self, hidden_size, n_out=1, mlp_hidden=64, bias_init=None):
        super().__init__()
        self.net = (nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, n_out))
                    if mlp_hidden else nn.Linear(hidden_size, n_out))
        last = self.net[-1] if mlp_hidden else self.net
        if bias_init is not None:
            nn.init.zeros_(last.weight)
            nn.init.constant_(last.bias, bias_init)

    def forward(self, h):
        h = h.float()
        return self.net(F.rms_norm(h, (h.shape[-1],)))


class StandIn(nn.Module):
    """What a token that passes over a unit gets instead of it (FlexiDepth's adapter): a small
    bottleneck MLP on the RMS-normalized state, added to the residual stream, x <- x + up(gelu(
    down(norm(x)))). `up` starts at zero, so a new stand-in is the plain skip. For SmolLM2-135M at
    rank 64 it holds 74k weights, 2% of a layer's 3.5M: the skip keeps its saving, and the token
    no longer just misses the layer's update. (ffn units: it replaces the MLP alone.)"""

    def __init__(self, hidden_size, rank):
        super().__init__()
        self.down, self.up = nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        h = x.float()
        return self.up(F.gelu(self.down(F.rms_norm(h, (h.shape[-1],))))).to(x.dtype)


def unit_layout(n_layers, pattern="every", start=1, stop=-1, group=1):
    """skip / ffn units: layers start..stop-1 (stop < 0 counts from the end; the defaults keep
    the first and the last layer always on) in runs of `group`; 'every_other' gates units 0, 2, ..."""
    stop_at = stop + n_layers if stop < 0 else stop
    if pattern not in ("every", "every_other"):
        raise ValueError(f"router_pattern={pattern!r}: use 'every' (a gate on every unit) or 'every_other'.")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"router_group={group!r}: the layers per routed unit must be an int >= 1.")
    if not 1 <= start < stop_at <= n_layers:
        raise ValueError(f"router_start={start}, router_stop={stop} leave no routed layers on this {n_layers}-layer "
                         f"model: need 1 <= router_start < router_stop <= {n_layers} (router_stop < 0 counts from "
                         "the end; layer 0 always runs).")
    units = [(a, min(a + group, stop_at)) for a in range(start, stop_at, group)]
    return units[::2] if pattern == "every_other" else units


def group_layout(n_layers, R, base_layers):
    """expert_choice / token_choice units: layers base_layers..L-1 cut into R contiguous groups
    (sizes as even as possible, the first ones a layer longer). A token's depth d in 0..R is the
    number of groups it ran."""
    if not isinstance(base_layers, int) or not 1 <= base_layers < n_layers:
        raise ValueError(f"base_layers={base_layers}: need 1 <= base_layers < {n_layers} (layer 0 is never skipped "
                         "and at least one layer must be left to route).")
    if not isinstance(R, int) or not 1 <= R <= n_layers - base_layers:
        raise ValueError(f"R={R}: this model has {n_layers} layers, {n_layers - base_layers} after base_layers="
                         f"{base_layers}; use 1 <= R <= {n_layers - base_layers} (or lower base_layers).")
    rest = n_layers - base_layers
    edges = [base_layers + sum(rest // R + (g < rest % R) for g in range(i)) for i in range(R + 1)]
    return [(edges[g], edges[g + 1]) for g in range(R)]


class FrozenRouters(nn.Module):
    """The trainable part of depth routing on a frozen model: gates over `units`, and optional exit
    gates at `exit_layers` (a token whose exit gate fires stops there: CALM's learned confidence).
    Everything a router file holds; hf_wrap.DepthAdapter decides with it, tune.py trains it."""

    def __init__(self, kind, hidden_size, units, exit_layers=(), mlp_hidden=64, init_logit=GATE_INIT_LOGIT,
                 stand_in_rank=0):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; choose one of {', '.join(ROUTER_KINDS)}.")
        self.kind, self.mlp_hidden = kind, mlp_hidden
        self.units, self.exit_layers = [tuple(u) for u in units], sorted(int(l) for l in exit_layers)
        if self.exit_layers and not 1 <= self.exit_layers[0] <= self.exit_layers[-1] < self.units[-1][1]:
            raise ValueError(f"exit_layers={list(exit_layers)}: an exit gate sits at the input of layer l, 1 <= l < "
                             f"{self.units[-1][1]} (a token must run layer 0).")
        n_gates, n_out = (1, len(self.units) + 1) if kind == "token_choice" else (len(self.units), 1)
        # token-choice starts with every token at full depth: the last depth's logit gets the head start
        # init_logit: every token's first weight, sigmoid(init_logit) (tune.py starts the gates at the budget)
        self.gates = nn.ModuleList(Gate(hidden_size, n_out, mlp_hidden, init_logit) for _ in range(n_gates))
        if kind == "token_choice":                    # every token starts at full depth: depth U leads by 3
            last = self.gates[0].net[-1] if mlp_hidden else self.gates[0].net
            last.bias.data.zero_()[-1] = GATE_INIT_LOGIT
        self.exits = nn.ModuleList(Gate(hidden_size, 1, mlp_hidden, EXIT_INIT_LOGIT) for _ in self.exit_layers)
        # skip / ffn: stand_in_rank > 0 gives every unit a StandIn for the tokens that pass over it
        if stand_in_rank and kind not in ("skip", "ffn"):
            raise ValueError(f"stand_in_rank={stand_in_rank}: stand-ins replace a skipped unit (skip, ffn); {kind} "
                             "routers stop tokens instead.")
        self.stand_in_rank = stand_in_rank
        self.stand_ins = (nn.ModuleList(StandIn(hidden_size, stand_in_rank) for _ in self.units) if stand_in_rank
                          else None)
        self.unit_at = {a: u for u, (a, _) in enumerate(self.units)}         # layer -> the unit that starts there
        self.unit_of = {l: u for u, (a, b) in enumerate(self.units) for l in range(a, b)}
        self.exit_at = {l: i for i, l in enumerate(self.exit_layers)}

    def continue_weights(self, u, h, carry=None, hard=False):
        """Training: unit u's continue weight w_u (B, T, 1) from the state h entering it, and what
        to carry to unit u + 1. hard: the 0/1 decision in the forward pass and the soft weight's
        gradient in the backward (straight-through), so training ends on what inference does."""
        if self.kind == "token_choice":
            if u == 0:                                                        # one decision for all units
                p = torch.softmax(self.gates[0](h), -1)                       # (B, T, U + 1) over depths
                if hard:
                    p = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype) + p - p.detach()
                carry = 1 - p.cumsum(-1)                                      # [..., u] = P(depth > u)
            return carry[..., u:u + 1], carry
        z = self.gates[u](h)                                                  # (B, T, 1)
        w = torch.sigmoid(z)
        if hard:
            w = (z > 0).to(w.dtype) + w - w.detach()
        if self.kind == "expert_choice" and carry is not None:
            w = w * carry                                                     # hierarchical: out is out for good
        return w, w


# CALM's training-free exits, measured once on the full model (tune.quality_table's cheap threshold search)

@torch.no_grad()
def exit_statistics(model, windows, batch_size=8):
    """For CALM's training-free exits, measured once on the full model: every token's top-1 probability and
    entropy (nats) of its state entering each layer 1..L-1, through the final norm and LM head. -> {"confidence":
    (N, L - 1), "entropy": (N, L - 1)}; column l - 1 is the state entering layer l."""
    head, norm, conf, ent = model.get_output_embeddings(), model.model.norm, [], []
    for i in range(0, len(windows), batch_size):
        hs = model.model(windows[i:i + batch_size, :-1].to(head.weight.device), output_hidden_states=True).hidden_states
        c, e = [], []
        for h in hs[1:-1]:                                                   # hidden_states[l] enters layer l
            logp = F.log_softmax(head(norm(h)).float(), -1).flatten(0, 1)
            c.append(logp.max(-1).values.exp())
            e.append(-(logp.exp() * logp).sum(-1))
        conf.append(torch.stack(c, 1).cpu())
        ent.append(torch.stack(e, 1).cpu())
    return {"confidence": torch.cat(conf), "entropy": torch.cat(ent)}


def exit_ratio(stats, kind, threshold):
    """The layer-call ratio the exit `kind` gives at `threshold` if every token exits at the first layer whose
    statistic passes (stats: exit_statistics) -> {"layer_ratio": ...}, for search_cutoff."""
    s = stats[kind]                                                           # (N, L - 1)
    ok = s >= threshold if kind == "confidence" else s <= threshold
    L = s.shape[1] + 1
    layers = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((len(s),), L))   # layers run
    return {"layer_ratio": float(layers.float().mean()) / L}


# Router files: one format for every kind, loaded with weights_only=True.
ROUTER_FILE_FORMAT = "nanomor-hf-routers-v2"
EXIT_HEAD_FILE_FORMAT = "nanomor-hf-exit-head-v1"     # a speculative draft head (ExitHead, below)
DRAFTER_FILE_FORMAT = "nanomor-hf-drafter-v1"         # a speculative drafter on the final state (Drafter, below)


def model_shape(config):
    """What a router file must match to load on a model."""
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


def save_router_file(path, fmt, module, model_config, layout, **meta):
    """Atomic torch.save: module's weights, its layout, the model's shape and meta (plain types,
    tensors; meta['model'] = the model's name or path, what sample.py loads without --hf)."""
    from configurator import save_checkpoint
    save_checkpoint({"format": fmt, **model_shape(model_config), **layout, **meta,
                     "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, path)


def read_router_file(path, tune_command="python tune.py"):
    """The dict in a router file. ValueError says what to do."""
    if not os.path.isfile(path):
        raise ValueError(f"no router file at {path!r}: router tuning ({tune_command}) writes out_dir/routers.pt.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable router file ({type(e).__name__}: {str(e)[:120]}); it may be "
                         "truncated: tune the routers again.") from None
    if not isinstance(blob, dict) or blob.get("format") not in (ROUTER_FILE_FORMAT, EXIT_HEAD_FILE_FORMAT,
                                                                        DRAFTER_FILE_FORMAT):
        raise ValueError(f"{path} is not a router file of this version (format {blob.get('format') if isinstance(blob, dict) else None!r}): "
                         f"tune the routers again ({tune_command}).")
    return blob


def load_router_file(path, model_config, make, tune_command="python tune.py"):
    """-> (make(blob) with the file's weights, blob). ValueError when it was tuned for another model."""
    blob = read_router_file(path, tune_command)
    want = model_shape(model_config)
    bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
    if bad:
        raise ValueError(f"{path} was tuned for another model ({blob.get('model')!r}: {bad}); this one has "
                         f"{ {k: want[k] for k in bad} }. Tune routers for this model: {tune_command}.")
    module = make(blob)
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its recorded layout ({str(e).splitlines()[0]}).") from None
    return module, blob


def save_routers(path, routers, model_config, **meta):
    save_router_file(path, ROUTER_FILE_FORMAT, routers, model_config, {
        "router": routers.kind, "units": [list(u) for u in routers.units], "exit_layers": routers.exit_layers,
        "mlp_hidden": routers.mlp_hidden, "stand_in_rank": routers.stand_in_rank}, **meta)


def load_routers(path, model_config, tune_command="python tune.py"):
    """-> (FrozenRouters, the file's dict)."""
    def make(blob):
        if blob["format"] != ROUTER_FILE_FORMAT:
            raise ValueError(f"{path} holds a speculative draft: use it with router={blob['router']!r}.")
        return FrozenRouters(blob["router"], model_config.hidden_size, blob["units"], blob["exit_layers"],
                             blob["mlp_hidden"], stand_in_rank=blob.get("stand_in_rank", 0))
    return load_router_file(path, model_config, make, tune_command)


# -----------------------------------------------------------------------------
# A speculative draft head for a frozen model (tune.py --exit_head_layer trains it)

class ExitHead(nn.Module):
    """A trained draft head at the input of layer `layer` (Kangaroo's adapter on a shallow sub-network; base
    frozen): h -> h + up(silu(down(rms_norm(h)))), a low-rank residual adapter whose `up` starts at zero ->
    RMSNorm (starts as a copy of the model's final norm) -> the model's own LM head rows for `vocab`. vocab (V',)
    holds the tokens it can propose (the tuning text's most frequent: SmolLM2's full head is ~20% of a CPU
    decode step). Speculative decoding stays exact: a token outside vocab is never proposed (probability 0)."""

    def __init__(self, hidden_size, layer, vocab, rank=128, eps=1e-5):
        super().__init__()
        self.layer, self.rank = layer, rank
        self.register_buffer("vocab", torch.as_tensor(vocab, dtype=torch.long))
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def forward(self, h, head_weight):
        """h (..., C): the state entering `layer`; head_weight (V', C): the LM head's rows for vocab -> (..., V')."""
        h = h.float()
        h = h + self.up(F.silu(self.down(F.rms_norm(h, (h.shape[-1],)))))
        return F.linear(self.norm(h).to(head_weight.dtype), head_weight)


def new_exit_head(model, layer, vocab=None, rank=128):
    """An untrained ExitHead for `model` at `layer` (vocab None: every token), its norm copied from the model's."""
    cfg = model.config
    if not isinstance(layer, int) or not 1 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"exit head layer={layer!r}: the head reads the state entering layer l, "
                         f"1 <= l <= {cfg.num_hidden_layers - 1} (layer 0 always runs).")
    vocab = torch.arange(cfg.vocab_size) if vocab is None else vocab
    head = ExitHead(cfg.hidden_size, layer, vocab, rank, model.model.norm.variance_epsilon)
    head.norm.weight.data.copy_(model.model.norm.weight.float())
    return head.to(model.get_input_embeddings().weight.device)


def save_exit_head(path, head, hf_model, **meta):
    save_router_file(path, EXIT_HEAD_FILE_FORMAT, head, hf_model.config, {
        "router": "exit_head", "layer": head.layer, "rank": head.rank, "head_vocab": head.vocab.numel()}, **meta)


def load_exit_head(path, model, tune_command="python tune.py"):
    """-> (ExitHead, the file's dict)."""
    def make(blob):
        if blob["format"] != EXIT_HEAD_FILE_FORMAT:
            raise ValueError(f"{path} holds a {blob.get('router')!r} file, not an exit head: use "
                             f"router={blob.get('router')!r} with it.")
        return ExitHead(model.config.hidden_size, blob["layer"], torch.zeros(blob["head_vocab"]), blob["rank"],
                        model.model.norm.variance_epsilon)
    return load_router_file(path, model.config, make, tune_command)


# -----------------------------------------------------------------------------
# A speculative drafter on top of the full model (tune.py --drafter=True trains it)

class Drafter(nn.Module):
    """A recurrent drafter (ReDrafter, Cheng et al. 2024; the idea of Medusa, Hydra and EAGLE: draft from the
    full model's last state, which a verify pass computes anyway), base frozen. After the full model ran at
    position t, s = its final state there (before the final norm) and x = the token it chose for t + 1. Then
        s <- s + up(silu(down([rms_norm(s); rms_norm(embed(x))])))       one step: no layer of the model runs
        q  = softmax(head_rows(norm(s)))                                 the draft for token t + 2
    and again from (s, the drafted token) for t + 3, t + 4, ... A draft costs one small MLP and the LM head's
    rows for `vocab` (the tuning text's most frequent tokens, as ExitHead): a few percent of a decode step, where
    a shallow exit pays for the layers below it. What it cannot know is everything the full model would still
    compute from x: it learns that from the tuning text."""

    def __init__(self, hidden_size, vocab, hidden=512, eps=1e-5):
        super().__init__()
        self.hidden = hidden
        self.register_buffer("vocab", torch.as_tensor(vocab, dtype=torch.long))
        self.down = nn.Linear(2 * hidden_size, hidden, bias=False)
        self.up = nn.Linear(hidden, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def step(self, s, e):
        """s (..., C) the state so far, e (..., C) the embedding of the token after it -> the next state."""
        s, e = s.float(), e.float()
        C = s.shape[-1]
        return s + self.up(F.silu(self.down(torch.cat([F.rms_norm(s, (C,)), F.rms_norm(e, (C,))], -1))))

    def forward(self, s, head_weight):
        """s (..., C) a state from step(); head_weight (V', C) the LM head's rows for vocab -> logits (..., V')."""
        return F.linear(self.norm(s).to(head_weight.dtype), head_weight)


def new_drafter(model, vocab=None, hidden=512):
    """An untrained Drafter for `model` (vocab None: every token), its norm copied from the model's final norm."""
    cfg = model.config
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"drafter hidden={hidden!r}: the width of its MLP, an int >= 1 (512 is a good start).")
    vocab = torch.arange(cfg.vocab_size) if vocab is None else vocab
    drafter = Drafter(cfg.hidden_size, vocab, hidden, model.model.norm.variance_epsilon)
    drafter.norm.weight.data.copy_(model.model.norm.weight.float())
    return drafter.to(model.get_input_embeddings().weight.device)


def save_drafter(path, drafter, hf_model, **meta):
    save_router_file(path, DRAFTER_FILE_FORMAT, drafter, hf_model.config, {
        "router": "drafter", "hidden": drafter.hidden, "head_vocab": drafter.vocab.numel()}, **meta)


def load_drafter(path, model, tune_command="python tune.py"):
    """-> (Drafter, the file's dict)."""
    def make(blob):
        if blob["format"] != DRAFTER_FILE_FORMAT:
            raise ValueError(f"{path} holds a {blob.get('router')!r} file, not a drafter: use "
                             f"router={blob.get('router')!r} with it.")
        return Drafter(model.config.hidden_size, torch.zeros(blob["head_vocab"]), blob["hidden"],
                       model.model.norm.variance_epsilon)
    return load_router_file(path, model.config, make, tune_command)

"""
hf_wrap.py: depth-adaptive inference for pretrained Hugging Face causal LMs (Llama family), weights untouched.

Every router comes down to two decisions per layer, for each token: does it stop here (its state then goes through
the final norm and LM head: early exit), and does it run this layer (else it keeps its state)? One loop
(DepthAdapter.forward_chunk) asks both at every layer, in prefill and decode alike, and runs the layer's attention
and MLP on the tokens that run it, packed (model.ActiveSet, the native model's form).

The routers (tune.py trains the trainable ones with the base frozen):
  none            every token runs every layer: the exact full-depth mode
  fixed           every token stops after base_layers + `depth` of R groups
  drop            the same `drop_layers` are passed over by every token (ShortGPT's static baseline)
  exit_head       every token runs the layers before one layer, then a small trained head (a speculative draft)
  confidence, entropy   stop at a group start when the state so far, through the final norm and LM head, is
                  sure enough (CALM, training-free; an LM-head call on the active tokens is the price)
  expert_choice   a trained gate per group: stay or stop (MoR's expert-choice, made causal by a cutoff)
  token_choice    one trained router after base_layers picks each token's depth 0..R (MoR's token-choice);
                  both may keep tail layers: the last layers, run by every token, stopped or not
  skip, ffn       a trained gate per unit: run it or pass over it (MindSkip), optional exit gates; ffn: the
                  MLPs only, attention always runs (FlexiDepth). Optional trained stand-ins for who passes over.
Any trained kind may carry healing: low-rank corrections (LoRA) of the layers that run, trained with the gates,
off at full depth.

K/V, one rule: EVERY token writes its K/V at every layer some token may run, from the state it has there, so later
tokens attend to every earlier one at every layer, as in the full model. A token that stopped (or passes over the
layer) pays the K/V projections only: for SmolLM2-135M (q, o 576x576; k, v 576x192; MLP 3 x 576x1536) 6.3% of a
layer's weights, for Llama-3-8B shapes 3.8%. Layers nobody can reach (fixed depth, dropped layers, past an exit
head) get no K/V at all.

Exactness: router 'none' reproduces model.generate's tokens and logits (float32 and bfloat16, sliding windows
included) on tiny random models of SUPPORTED_MODEL_TYPES and on the built-in real one; speculative.generate drafts
with any router and outputs the full model's text. Batches > 1 need LEFT padding. Models come from data.load_hf.
"""
import contextlib
import math
import os
import time
import types
import warnings
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import error_line, save_checkpoint
from kv_cache import from_grid, sdpa, to_grid
from model import ActiveSet, apply_rope, sample_next
from router import depth_summary

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GROUP_ROUTERS = ("fixed", "confidence", "entropy", "expert_choice", "token_choice")   # decide at group starts
ROUTERS = ("none", "drop", "exit_head", *GROUP_ROUTERS, "skip", "ffn")
TUNE_COMMAND = "python tune.py --hf=<model> --router=<kind>"   # writes data.default_routers(model, kind)
DEFAULT_THRESHOLD = {"confidence": 0.9, "entropy": 1.0}      # top-1 probability / entropy in nats


# -----------------------------------------------------------------------------
# The trainable decisions (DepthAdapter runs them, tune.py trains them)
#
# The routed layers are cut into *units* (runs of layers under one decision). Training
# blends instead of deciding: unit u's update is scaled by a continue weight w_u in [0, 1],
# x <- x + w_u * (unit(x) - x) (ffn: the MLP's update only), w_u from the gate logits z:
#   skip, ffn:      w_u = sigmoid(z_u)                     independent per unit
#   expert_choice:  w_u = w_{u-1} * sigmoid(z_u)           once out, out for good (hierarchical)
#   token_choice:   w_u = P(depth > u) = 1 - cumsum(softmax(z))[u]
# Inference makes the 0/1 decision those weights stand for, with one knob, `bias`: a gate
# passes when z_u > bias, and token-choice takes argmax_d (z_d - bias * d). bias = 0 is the
# decision training ended on; a larger bias runs fewer layers.

ROUTER_KINDS = ("skip", "ffn", "expert_choice", "token_choice")
GATE_INIT_LOGIT = 3.0     # a new gate starts at sigmoid(3) = 0.95: the untrained routers are nearly the full model
EXIT_INIT_LOGIT = -3.0    # a new exit gate starts at 0.05: nobody exits until it is trained


class DecisionNet(nn.Module):
    """One decision point: state (..., C) -> logits (..., n_out), float32. RMS-normalized without
    weights (pretrained residual streams carry a few huge channels), then a small MLP (mlp_hidden=0:
    a linear map). bias_init: zero weights and this bias, so every token starts at sigmoid(bias_init)."""

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
    """What a token that passes over a unit gets instead (FlexiDepth's adapter; ffn: instead of the MLP):
    x <- x + up(gelu(down(rms_norm(x)))), `up` zero at first (the plain skip). SmolLM2-135M, rank 64:
    2% of a layer's weights."""

    def __init__(self, hidden_size, rank):
        super().__init__()
        self.down, self.up = nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        h = x.float()
        return self.up(F.gelu(self.down(F.rms_norm(h, (h.shape[-1],))))).to(x.dtype)


class Healing(nn.Module):
    """Healing for one layer: a trainable low-rank correction of its seven projections (LoRA), for the tokens that
    run it while others pass over layers: W x + up(down(x)), `up` zero at first (the layer as it is). The base
    weights stay untouched; the adapter applies it at run time, off at full depth. shapes: {name: (in, out)}
    (heal_shapes). Rank 8 on SmolLM2-135M: 81k weights, 2.3% of a layer's (FLOPs alike: one multiply-add per weight
    per token)."""

    PROJECTIONS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                   "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                   "down_proj": "mlp.down_proj"}                         # name -> where it sits in a decoder layer

    def __init__(self, shapes, rank):
        super().__init__()
        self.down = nn.ModuleDict({n: nn.Linear(shapes[n][0], rank, bias=False) for n in self.PROJECTIONS})
        self.up = nn.ModuleDict({n: nn.Linear(rank, shapes[n][1], bias=False) for n in self.PROJECTIONS})
        for up in self.up.values():
            nn.init.zeros_(up.weight)

    def forward(self, name, x):
        """Projection `name`'s correction for its input x (..., in) -> (..., out), in x's dtype."""
        return self.up[name](self.down[name](x.float())).to(x.dtype)

    def share(self, names, layer_weights):
        """The multiply-adds per token of these projections' corrections, in layers (their weights' share)."""
        return sum(n_weights(self.down[n]) + n_weights(self.up[n]) for n in names) / layer_weights


def heal_shapes(layer):
    """A decoder layer's projections -> {name: (in_features, out_features)}, what Healing is built for."""
    return {n: [layer.get_submodule(path).in_features, layer.get_submodule(path).out_features]
            for n, path in Healing.PROJECTIONS.items()}


def unit_layout(n_layers, pattern="every", start=1, stop=-1, group=1):
    """skip / ffn units: layers start..stop-1 (stop < 0 counts from the end; by default the first
    and last layer always run) in runs of `group`; 'every_other' gates units 0, 2, ..."""
    stop_at = stop + n_layers if stop < 0 else stop
    if pattern not in ("every", "every_other"):
        raise ValueError(f"router_pattern={pattern!r}: use 'every' (a gate on every unit) or 'every_other'.")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"router_group={group!r}: the layers per routed unit must be an int >= 1.")
    if not 1 <= start < stop_at <= n_layers:
        raise ValueError(f"router_start={start}, router_stop={stop} leave no routed layers on this {n_layers}-layer "
                         f"model: need 1 <= router_start < router_stop <= {n_layers} (< 0 counts from the end).")
    units = [(a, min(a + group, stop_at)) for a in range(start, stop_at, group)]
    return units[::2] if pattern == "every_other" else units


def group_keep(keep_ratio, G):
    """expert_choice's share q of the tokens reaching each of its G nested groups for which the routed layer calls
    come to keep_ratio: a token reaches group g with probability q^g, so mean(q^1..q^G) = keep_ratio (bisection).
    Keeping keep_ratio at every group instead would run keep_ratio^g of the tokens in group g: 0.6 over 7 groups
    is 21% of the calls, not 60%."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if sum(q ** g for g in range(1, G + 1)) / G < keep_ratio else (lo, q)
    return (lo + hi) / 2


def group_layout(n_layers, R, base_layers, tail_layers=0):
    """expert_choice / token_choice units: layers base_layers..L-1-tail_layers cut into R contiguous groups, as
    even as possible (the first ones a layer longer). A token's depth 0..R: the groups it ran. The last
    tail_layers layers then run for every token, stopped or not (MoR's middle-cycle sharing keeps its last layer
    unique: the last layers turn a state into a prediction)."""
    if not isinstance(tail_layers, int) or tail_layers < 0:
        raise ValueError(f"tail_layers={tail_layers!r}: the last layers every token runs, an int >= 0.")
    if not isinstance(base_layers, int) or not 1 <= base_layers < n_layers - tail_layers:
        raise ValueError(f"base_layers={base_layers}, tail_layers={tail_layers}: need 1 <= base_layers < "
                         f"{n_layers} - tail_layers (layer 0 always runs, and one layer at least is left to route).")
    rest = n_layers - base_layers - tail_layers
    if not isinstance(R, int) or not 1 <= R <= rest:
        raise ValueError(f"R={R}: this model has {n_layers} layers, {rest} between base_layers={base_layers} and "
                         f"tail_layers={tail_layers}; use 1 <= R <= {rest} (or lower base_layers / tail_layers).")
    edges = [base_layers + sum(rest // R + (g < rest % R) for g in range(i)) for i in range(R + 1)]
    return [(edges[g], edges[g + 1]) for g in range(R)]


class FrozenRouters(nn.Module):
    """What a router file holds: gates over `units`, optional exit gates at `exit_layers` (CALM's
    learned confidence), optional stand-ins (skip, ffn), optional healing (Healing of heal_rank at each of
    heal_layers, built for heal_shapes). tail_layers (group kinds): the layers after the last group, run by every
    token (the units end before them; recorded for the file and the tables)."""

    def __init__(self, kind, hidden_size, units, exit_layers=(), mlp_hidden=64, init_logit=GATE_INIT_LOGIT,
                 stand_in_rank=0, heal_rank=0, heal_layers=(), heal_shapes=None, tail_layers=0):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; choose one of {', '.join(ROUTER_KINDS)}.")
        self.kind, self.mlp_hidden = kind, mlp_hidden
        self.units, self.exit_layers = [tuple(u) for u in units], sorted(int(l) for l in exit_layers)
        if self.exit_layers and not 1 <= self.exit_layers[0] <= self.exit_layers[-1] < self.units[-1][1]:
            raise ValueError(f"exit_layers={list(exit_layers)}: an exit gate sits at the input of layer l, 1 <= l < "
                             f"{self.units[-1][1]} (a token must run layer 0).")
        n_gates, n_out = (1, len(self.units) + 1) if kind == "token_choice" else (len(self.units), 1)
        # init_logit: every token's first weight, sigmoid(init_logit) (tune.py starts the gates at the budget)
        self.gates = nn.ModuleList(DecisionNet(hidden_size, n_out, mlp_hidden, init_logit) for _ in range(n_gates))
        if kind == "token_choice":                    # every token starts at full depth: depth U leads by 3
            last = self.gates[0].net[-1] if mlp_hidden else self.gates[0].net
            last.bias.data.zero_()[-1] = GATE_INIT_LOGIT
        self.exits = nn.ModuleList(DecisionNet(hidden_size, 1, mlp_hidden, EXIT_INIT_LOGIT) for _ in self.exit_layers)
        if stand_in_rank and kind not in ("skip", "ffn"):
            raise ValueError(f"stand_in_rank={stand_in_rank}: stand-ins replace a skipped unit (skip, ffn); {kind} "
                             "stops tokens instead.")
        self.stand_in_rank = stand_in_rank
        self.stand_ins = (nn.ModuleList(StandIn(hidden_size, stand_in_rank) for _ in self.units) if stand_in_rank
                          else None)
        self.unit_of = {l: u for u, (a, b) in enumerate(self.units) for l in range(a, b)}
        self.exit_at = {l: i for i, l in enumerate(self.exit_layers)}
        if tail_layers and kind not in ("expert_choice", "token_choice"):
            raise ValueError(f"tail_layers={tail_layers}: tail layers follow the groups of expert_choice / "
                             f"token_choice; {kind} gates each unit (its last layer already runs for everyone).")
        if heal_rank and not heal_layers:
            raise ValueError(f"heal_rank={heal_rank} needs heal_layers, the layers whose projections it corrects.")
        self.tail_layers, self.heal_rank = tail_layers, heal_rank
        self.heal_layers = [int(l) for l in heal_layers] if heal_rank else []
        self.heal_shapes = heal_shapes if heal_rank else None
        self.heals = nn.ModuleList(Healing(heal_shapes, heal_rank) for _ in self.heal_layers) if heal_rank else None

    def healing(self):
        """{layer: its Healing}, {} without."""
        return dict(zip(self.heal_layers, self.heals)) if self.heals is not None else {}

    @contextlib.contextmanager
    def healed(self, layers):
        """The tuning forward runs HF's own layers (tune.soft_forward): while inside, forward hooks on the healed
        layers' projections add their corrections, for every token (the tuning forward weighs each layer's update
        afterwards, as the adapter runs a layer only for the tokens that go on)."""
        handles = []
        for l, heal in self.healing().items():
            for name, path in Healing.PROJECTIONS.items():
                add = lambda module, args, out, heal=heal, name=name: out + heal(name, args[0])
                handles.append(layers[l].get_submodule(path).register_forward_hook(add))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def describe(self):
        """A short name for tables: 'skip', 'skip + stand-ins r64 + healing r8', 'expert_choice + tail 2'."""
        return self.kind + "".join(f" + {what}{n}" for what, n in (("stand-ins r", self.stand_in_rank),
                                                                    ("tail ", self.tail_layers),
                                                                    ("healing r", self.heal_rank)) if n)

    def continue_weights(self, u, h, carry=None, hard=False):
        """Training: unit u's continue weight w_u (B, T, 1) from the state h entering it, and what to
        carry to unit u + 1. hard: straight-through (the 0/1 decision forward, the soft gradient back)."""
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


# Router files: a trained module's weights, its layout and the model's shape; loaded with weights_only=True.
ROUTER_FILE_FORMAT = "nanomor-hf-routers-v2"
EXIT_HEAD_FILE_FORMAT = "nanomor-hf-exit-head-v1"     # a speculative draft head (ExitHead, below)
DRAFTER_FILE_FORMAT = "nanomor-hf-drafter-v1"         # a speculative drafter on the final state (speculative.py)
FILE_HOLDS = {ROUTER_FILE_FORMAT: "trained routers", EXIT_HEAD_FILE_FORMAT: "an exit head",
              DRAFTER_FILE_FORMAT: "a drafter"}
NOT_A_ROUTER = ("a drafter is no router kind: it drafts for speculative decoding. speculative.load_drafter(path, "
                "model), then speculative.generate(DepthAdapter(model), ids, K=4, drafter=it).")


def model_shape(config):
    """What a router file must match to load on a model."""
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


def save_router_file(path, fmt, module, model_config, layout, **meta):
    """Atomic torch.save: module's weights, its layout, the model's shape and meta (plain types,
    tensors; meta['model'] = the model's name or path, what sample.py loads without --hf)."""
    save_checkpoint({"format": fmt, **model_shape(model_config), **layout, **meta,
                     "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, path)


def read_router_file(path, tune_command="python tune.py"):
    """The dict in a router file of any format. ValueError says what to do."""
    if not os.path.isfile(path):
        raise ValueError(f"no router file at {path!r}: router tuning ({tune_command}) writes out_dir/routers.pt.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable router file ({error_line(e)}); it may be "
                         "truncated: tune the routers again.") from None
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt not in FILE_HOLDS:
        raise ValueError(f"{path} is not a router file of this version (format {fmt!r}): "
                         f"tune the routers again ({tune_command}).")
    return blob


def load_router_file(path, model_config, fmt, make, tune_command="python tune.py", unfinished_ok=False):
    """A file of format `fmt` -> (make(blob) with the file's weights, blob). ValueError when it holds another
    kind of module, was tuned for another model, or (unless unfinished_ok) is not ready: unready() says why."""
    blob = read_router_file(path, tune_command)
    if blob["format"] != fmt:
        raise ValueError(f"{path} holds {FILE_HOLDS[blob['format']]}, not {FILE_HOLDS[fmt]}: " + (
            NOT_A_ROUTER if blob["format"] == DRAFTER_FILE_FORMAT else f"use router={blob.get('router')!r} with it."))
    want = model_shape(model_config)
    bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
    if bad:
        raise ValueError(f"{path} was tuned for another model ({blob.get('model')!r}: {bad}); this one has "
                         f"{ {k: want[k] for k in bad} }. Tune routers for this model: {tune_command}.")
    module = make(blob)
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its recorded layout ({_state_dict_fault(e)}).") from None
    problem = unready(blob, path)
    if problem and not unfinished_ok:
        raise ValueError(f"{problem}." + (" random_routers=True (--random_routers) runs it anyway, for speed "
                                          "measurements only." if fmt == ROUTER_FILE_FORMAT else ""))
    return module, blob


def _state_dict_fault(e):
    """load_state_dict's first line only names the module; its next line says which keys or shapes differ."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[1:2] or lines[:1])


def save_routers(path, routers, model_config, **meta):
    save_router_file(path, ROUTER_FILE_FORMAT, routers, model_config, {
        "router": routers.kind, "units": [list(u) for u in routers.units], "exit_layers": routers.exit_layers,
        "mlp_hidden": routers.mlp_hidden, "stand_in_rank": routers.stand_in_rank, "tail_layers": routers.tail_layers,
        "heal_rank": routers.heal_rank, "heal_layers": routers.heal_layers, "heal_shapes": routers.heal_shapes}, **meta)


def load_routers(path, model_config, tune_command="python tune.py", unfinished_ok=False):
    """-> (FrozenRouters, the file's dict). A file that unready() finds fault with is refused (ValueError with the
    command that fixes it) unless unfinished_ok (tune.py's init_from, which resumes it; random_routers)."""
    def make(blob):
        return FrozenRouters(blob["router"], model_config.hidden_size, blob["units"], blob["exit_layers"],
                             blob["mlp_hidden"], stand_in_rank=blob.get("stand_in_rank", 0),
                             heal_rank=blob.get("heal_rank", 0), heal_layers=blob.get("heal_layers", ()),
                             heal_shapes=blob.get("heal_shapes"), tail_layers=blob.get("tail_layers", 0))
    return load_router_file(path, model_config, ROUTER_FILE_FORMAT, make, tune_command, unfinished_ok)


def unready(blob, path):
    """Why a router file (gates, an exit head or a drafter) is not ready to use, and the command that fixes it (""
    when ready): its tuning run stopped before the end (killed: the file is its last save), or it never trained
    (max_iters=0, no init_from, no influence start). tune.py records both (finished, iter_num of max_iters,
    calibrated, trained); files written before it did count as finished."""
    if not blob.get("finished", True):
        return (f"{path} is an unfinished tuning run: it stopped after iteration {blob.get('iter_num')} of "
                f"{blob.get('max_iters')}, {'calibrated' if blob.get('calibrated') else 'uncalibrated'}. Finish it "
                f"(from that iteration, with its settings): python tune.py --init_from={path}")
    if not blob.get("trained", True):
        out_dir = blob.get("config", {}).get("out_dir")
        what, flag = {EXIT_HEAD_FILE_FORMAT: ("an untrained exit head", f"--exit_head_layer={blob.get('layer')}"),
                      DRAFTER_FILE_FORMAT: ("an untrained drafter", "--drafter=True")}.get(
            blob["format"], (f"untrained {blob['router']} gates", f"--router={blob['router']}"))
        return (f"{path} holds {what} (its run had max_iters=0 and no init_from). Tune again: python tune.py "
                f"--hf={blob.get('model')} {flag}" + (f" --out_dir={out_dir}" if out_dir else ""))
    return ""


# -----------------------------------------------------------------------------
# A speculative draft head for a frozen model (tune.py --exit_head_layer trains it)

class ExitHead(nn.Module):
    """A trained draft head at the input of layer `layer` (Kangaroo's adapter on a shallow sub-network):
    h -> h + up(silu(down(rms_norm(h)))) (`up` zero at first) -> RMSNorm (at first the final norm's copy) -> the
    LM head's rows for vocab (V',), the tuning text's most frequent tokens (SmolLM2's full head is ~20% of a CPU
    decode step). A token outside vocab is never proposed, so speculative decoding stays exact."""

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
        return ExitHead(model.config.hidden_size, blob["layer"], torch.zeros(blob["head_vocab"]), blob["rank"],
                        model.model.norm.variance_epsilon)
    return load_router_file(path, model.config, EXIT_HEAD_FILE_FORMAT, make, tune_command)


# -----------------------------------------------------------------------------
# The decoding primitives: a cache, one pass over a chunk of tokens, its result (composed as gpt-fast composes
# prefill and decode_one)

class AdapterCache:
    """What a batch of sequences carries from one chunk to the next: the KV cache, per layer (B, n_kv, max_len,
    hd); key_valid (B, max_len), False at left padding; pos, each slot's position id; the gate cutoffs it decides
    with at keep_ratio < 1 (calibrate_next: the next chunk, the prompt, sets them). static: compiled decode."""

    def __init__(self, ad, B, max_len, key_valid, static=False):
        dev, dt = key_valid.device, ad.embed.weight.dtype
        shape = (B, ad.n_kv, max_len, ad.head_dim)
        # static: one set of buffers per shape, reused by every call, so a captured graph always reads and writes
        # the same memory (stale slots are masked: key slot <= query slot)
        pool = ad.static_cache.get((B, max_len)) if static else None
        if pool is None:
            pool = ([torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers],
                    [torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers],
                    torch.zeros(B, max_len, dtype=torch.bool, device=dev))
            if static:
                ad.static_cache[(B, max_len)] = pool
                if dev.type == "cuda":                                        # a CUDA graph writes them in place
                    for t in [*pool[0], *pool[1], pool[2]]:
                        torch._dynamo.mark_static_address(t)
        self.k, self.v, self.key_valid = pool
        self.key_valid.copy_(key_valid)
        self.no_pad, self.static = bool(key_valid.all()), static
        self.pos = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        self.cutoffs = None if ad.cutoffs is None else ad.cutoffs.clone().to(dev)
        self.calibrate_next = ad.keep_ratio is not None and ad.cutoffs is None and ad.router in ROUTER_KINDS
        if self.calibrate_next:
            self.cutoffs = torch.zeros(len(ad.units), device=dev)

    def realign(self, end, kept):
        """Speculative decoding: after a verify pass over slots end.., row b keeps its first kept[b] of them.
        -> the new end. Rows that keep different counts shift to end at the same slot (a shorter row gains left
        padding): the cache is then what full-depth decoding of each row's text would hold."""
        if bool((kept == kept[0]).all()):
            return end + int(kept[0])
        count = self.key_valid[:, :end].sum(1) + kept                         # (B,) tokens each row now holds
        new_end = int(count.max())
        slot = torch.arange(new_end, device=kept.device)
        src = (slot + (end + kept - new_end)[:, None]).clamp(0, self.pos.shape[1] - 1)   # (B, new_end) old slots
        for cache in self.k + self.v:                                         # (B, n_kv, max_len, hd)
            index = src[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
            cache[:, :, :new_end] = cache.gather(2, index)                    # gather copies: overlap is safe
        self.pos[:, :new_end] = self.pos.gather(1, src)
        self.key_valid[:, :new_end] = slot >= new_end - count[:, None]
        self.key_valid[:, new_end:] = True
        self.no_pad = bool(self.key_valid.all())
        return new_end


# One pass over a chunk: logits, the last position's (B, V) or every position's (B, T, V); depth (B, T) in decision
# units; cost (B, T) the layer-equivalents each token ran (K/V fill not included); final_h (B, T, C) before the
# final norm (a drafter's input); kv_only: token-layers that computed K/V alone; head_checks:
# CALM's LM-head calls.
Pass = namedtuple("Pass", "logits depth cost final_h kv_only head_checks")


class _Chunk:
    """One pass over cache slots start..end of every row. Tokens are the B*T rows of x (B*T, C), row-major; an
    ActiveSet lists the ones that run something. calibrating: this pass sets the cache's cutoffs."""

    def __init__(self, cache, start, B, T, cos, sin):
        self.cache, self.start, self.end, self.B, self.T = cache, start, start + T, B, T
        self.cos, self.sin = cos.flatten(0, 1), sin.flatten(0, 1)           # (B*T, hd) rotary angles
        self.valid = cache.key_valid[:, start:self.end].flatten()            # (B*T,) False at left padding
        self.everyone = ActiveSet.everyone(B, T, start, cos.device)
        self.masks, self.calibrating, self.head_checks = {}, cache.calibrate_next, 0
        # a compiled cache's decode step (one token per row): a layer everyone runs (or nobody) is compiled
        self.compiled = cache.static and T == 1
        self.slot = torch.full((1,), start, device=cos.device) if self.compiled else None

    def subset(self, mask):
        """(B*T,) bool -> the ActiveSet of those tokens (one host sync); everyone if all; None if none."""
        n = int(mask.sum())
        return None if n == 0 else self.everyone if n == self.B * self.T else self.everyone.subset(mask)[0]

    @staticmethod
    def take(t, s):                                                           # rows of t for the tokens in s
        return t if s.grid_index is None and s.n == s.B * s.T else t[s.flat]

    def put(self, x, s, h):
        if s.n == self.B * self.T:
            return h
        x[s.flat] = h
        return x

    def mask(self, s, lo, window):
        """Which cache slots lo..end the queries of s may read, (rows, 1, K, end - lo) bool, or None for all: not
        padding, not after the query, inside the sliding window (key j for query q when q - window < j). Grid pads
        and padded queries see at least one key (their output is dropped)."""
        key = (id(s), window)
        if key not in self.masks:
            if self.T == 1 and self.cache.no_pad:                               # decode, no padding: every key
                self.masks[key] = s, None
            else:
                j = torch.arange(lo, self.end, device=s.qpos.device)
                q = s.qpos[..., None]                                         # (rows, K, 1) query slots
                ok = self.cache.key_valid[s.rows][:, None, lo:self.end] & (j <= q)
                if window is not None:
                    ok = ok & (j > q - window)
                self.masks[key] = s, (ok | (j == q.clamp(max=self.end - 1)))[:, None]
        return self.masks[key][1]                                             # s is kept so id(s) stays unique

    def whole_cache_mask(self, window):
        """Compiled decode: which of ALL the cache's slots each row's query reads (decode_mask), once per window."""
        key = ("whole cache", window)
        if key not in self.masks:
            self.masks[key] = None, decode_mask(self.cache.key_valid, self.slot, window)
        return self.masks[key][1]

    def attend(self, l, q, s, scale, window):
        """q (N, H, hd), the queries of s -> (N, H, hd). Reads the cache's slots lo..end of s's rows."""
        lo = 0 if window is None else max(0, self.start + 1 - window)         # older keys are out of every window
        k, v = self.cache.k[l][:, :, lo:self.end], self.cache.v[l][:, :, lo:self.end]
        if not s.all_rows:
            k, v = k[s.rows], v[s.rows]
        o = sdpa(to_grid(q, s).transpose(1, 2), k, v, self.mask(s, lo, window), scale=scale)
        return from_grid(o.transpose(1, 2), s)


def decode_mask(key_valid, slot, window):
    """A compiled step's keys over the WHOLE cache, as gpt-fast reads it: not padding, not after the query's slot
    (slot (T,) the step's slots, a tensor, so no Python int changes between steps), inside the window.
    -> (B, 1, T, max_len) bool."""
    j = torch.arange(key_valid.shape[1], device=key_valid.device)
    seen = key_valid[:, None] & (j <= slot[:, None])                         # (B, T, max_len)
    return (seen if window is None else seen & (j > slot[:, None] - window))[:, None]


def decode_attention(q, k, v, mask, scale):
    """A compiled step's attention: q (B, H, T, hd) over the whole cache k, v (B, H_kv, S, hd) under mask (B, 1, T,
    S). On a CPU, for a few rows, written as multiplies, sums and a softmax that inductor fuses with the layer
    around it (SDPA is an opaque call there, ~4% of a SmolLM2-135M decode step); elsewhere SDPA."""
    B, H, T, hd = q.shape
    if q.device.type != "cpu" or B * T > 8 or not torch.compiler.is_compiling():
        return sdpa(q, k, v, mask, scale=scale)
    g = H // k.shape[1]                                                       # query heads per K/V head
    q = q.float().unflatten(1, (-1, g))[:, :, :, :, None]                      # (B, H_kv, g, T, 1, hd)
    scores = (q * k.float()[:, :, None, None]).sum(-1) * scale               # (B, H_kv, g, T, S)
    p = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    return (p[..., None] * v.float()[:, :, None, None]).sum(-2).flatten(1, 2).to(v.dtype)    # (B, H, T, hd)


def layer_window(config, i):
    """Layer i's sliding window, None = full attention: config.layer_types (Qwen2/Qwen3), else sliding_window."""
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if types is None:
        return window
    if types[i] not in ("full_attention", "sliding_attention"):
        raise ValueError(f"layer {i} has attention type {types[i]!r}; DepthAdapter handles full_attention "
                         "and sliding_attention.")
    return window if types[i] == "sliding_attention" else None


def head_rows(lm_head, vocab):
    """A draft head's rows of the LM head (V', C) float32, and its vocab; (the LM head's weight, None) when vocab
    is every token in order."""
    if torch.equal(vocab.cpu(), torch.arange(lm_head.weight.shape[0])):
        return lm_head.weight, None
    return lm_head.weight[vocab].float(), vocab


def spread(sub, vocab, V):
    """A draft head's logits over its vocab (..., V') -> over the model's V (..., V), -inf outside (never
    proposed)."""
    if vocab is None:
        return sub
    logits = sub.new_full((*sub.shape[:-1], V), -math.inf)
    logits[..., vocab] = sub
    return logits


# -----------------------------------------------------------------------------
# The adapter

SPECULATIVE_MOVED = "speculative decoding moved: speculative.generate(adapter, ids, K=4, lookup=n, drafter=d)."


class DepthAdapter:
    """Route each token of a pretrained Llama-family model through fewer layers (the module docstring).

    router: one of ROUTERS, each family with its own setup below. R, base_layers: the group routers' groups.
    depth: fixed's groups. exit_layer: an untrained exit head's layer. threshold (CALM): a top-1 probability /
    nats. bias (trained routers, the knob above): None is the tuning file's, else 0. keep_ratio < 1 (skip, ffn,
    expert_choice): the share of the routed layer calls kept, by per-unit cutoffs at a quantile of the gate logits on
    calibration text (the file's, or calibrate(windows)); expert_choice's nested groups each keep group_keep's share
    of the tokens that reach them. routers / router_path: a FrozenRouters or its file (exit_head: exit_head= or
    its file). random_routers: untrained routers, for speed measurements only.
    """

    def __init__(self, model, router="none", R=4, base_layers=2, keep_ratio=None, depth=None, threshold=None,
                 bias=None, router_path=None, routers=None, no_skip=False, exit_threshold=None, exits=True,
                 drop_layers=None, random_routers=False, exit_head=None, exit_layer=None):
        router = "none" if no_skip else router
        self._check_kind(model, router, keep_ratio)
        self.model, self.router, self.keep_ratio = model, router, keep_ratio
        self._read_model(model)
        # the decisions' attributes, every kind's: each family's setup below sets the ones it uses
        self.file, self.routers, self.exit_head, self.cutoffs, self.random_routers = {}, None, None, None, False
        self.units, self.static_layers, self.static_depth, self._stops = [], None, None, None
        self.threshold = self.bias = self.head_weight = self.head_vocab = self.exit_threshold = None
        self.stand_in_share, self.exit_cutoff, self.use_exits, self.unit_of = 0.0, math.inf, False, {}
        self.tail_start, self.heal = None, {}                # group kinds' tail layers; healing {layer: Healing}
        if router in ("none", "fixed", "drop", "exit_head"):
            self._setup_static(R, base_layers, depth, drop_layers, router_path, exit_head, exit_layer,
                               random_routers)
        elif router in ("confidence", "entropy"):
            self._setup_calm(R, base_layers, threshold, bias)
        else:
            self._setup_trained(R, base_layers, threshold, bias, router_path, routers, exit_threshold, exits,
                                random_routers)
        # what every kind's decisions and statistics read: the units, a token's cost at depth d (in layers)
        self.n_units, self.base_layers = max(len(self.units), 1), self.units[0][0] if self.units else 0
        self.unit_at = {a: u for u, (a, _) in enumerate(self.units)}         # layer -> the unit that starts there
        self.counts_groups = router in GROUP_ROUTERS                         # depth: groups run (else layers)
        self.attn_always = router == "ffn"                                   # ffn: attention always runs
        # generate(compile=True): pooled caches, a static plan's step, the layer step of the routed kinds
        self.static_cache, self.compiled_step, self.compiled_layer, self.compiled_head = {}, None, None, None
        self._full = self if router == "none" else None    # full_depth(): the verify pass of speculative decoding

    @staticmethod
    def _check_kind(model, router, keep_ratio):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"DepthAdapter supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family "
                             f"decoders); got {cfg.model_type!r} ({type(model).__name__}).")
        if router == "drafter":
            raise ValueError(NOT_A_ROUTER)
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}.")
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={keep_ratio}: the share of the routed layer calls kept lies in "
                             "(0, 1] (1.0: full depth; None: bias decides).")

    def _read_model(self, model):
        """The HF modules the loop runs; from their weights, the layer-equivalents of attention alone, K/V alone
        and one LM-head call."""
        cfg = model.config
        self.embed, self.layers = model.get_input_embeddings(), model.model.layers
        self.norm, self.lm_head, self.rotary = model.model.norm, model.get_output_embeddings(), model.model.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim, self.hidden_size, self.n_kv = attn.head_dim, cfg.hidden_size, cfg.num_key_value_heads
        self.windows = [layer_window(cfg, i) for i in range(len(self.layers))]   # None = full attention
        self.layer_weights = n_weights(attn) + n_weights(self.layers[0].mlp)
        self.attn_share = n_weights(attn) / self.layer_weights
        self.kv_share = (n_weights(attn.k_proj) + n_weights(attn.v_proj)) / self.layer_weights
        self.head_share = self.lm_head.weight.numel() / self.layer_weights

    def _group_units(self, units):
        """The group routers' units (group_layout's): a token of depth d ran groups 0..d-1, then the tail layers
        (from tail_start on, every token's)."""
        self.units, self.tail_start = units, units[-1][1]
        tail = len(self.layers) - self.tail_start
        self.layers_per_depth = [units[0][0] + tail] + [b + tail for _, b in units]

    def _refuse_untrained(self, given, everyone, random_routers):
        """Refuse a learned router without trained weights: random routing gives speed without quality."""
        self.random_routers = not given and not everyone
        if self.random_routers and not random_routers:
            raise ValueError(f"router={self.router!r} needs trained routers and none were given: tune them, "
                             f"{TUNE_COMMAND.replace('<kind>', self.router)} (an exit head: --exit_head_layer=l), "
                             "then pass router_path=<the file it wrote> (sample.py finds it). random_routers=True "
                             "(--random_routers) runs untrained ones, for speed measurements only.")

    # --- the three families: each sets what its kinds decide with ----------------------------------------
    def _setup_static(self, R, base_layers, depth, drop_layers, router_path, exit_head, exit_layer,
                      random_routers):
        """none, fixed, drop, exit_head: every token runs static_layers (no decisions, no host syncs, no K/V fill
        past them) and gets static_depth."""
        L, kind = len(self.layers), self.router
        self.layers_per_depth = [0, L] if kind == "none" else list(range(L + 1))
        if kind == "fixed":
            self._group_units(group_layout(L, R, base_layers))
            if not isinstance(depth, int) or not 0 <= depth <= len(self.units):
                raise ValueError(f"router='fixed' needs depth=d, the groups every token runs, an int in "
                                 f"0..R={len(self.units)}; got depth={depth!r}.")
            layers, self.static_depth = range(self.layers_per_depth[depth]), depth
        elif kind == "drop":
            drop = sorted(set(drop_layers or ()))
            if not drop or not all(isinstance(l, int) and 1 <= l < L for l in drop):
                raise ValueError(f"router='drop' needs drop_layers, layer indices in 1..{L - 1} (layer 0 always "
                                 f"runs); got {drop_layers!r}. tune.static_drop_layers() picks them by block "
                                 "influence.")
            layers = [l for l in range(L) if l not in drop]
        elif kind == "exit_head":
            layers = range(self._setup_exit_head(depth, router_path, exit_head, exit_layer, random_routers).layer)
        else:
            layers, self.static_depth = range(L), 1
        self.static_layers = tuple(layers)                                    # the layers every token runs
        if kind in ("drop", "exit_head"):
            self.static_depth = len(self.static_layers)

    def _setup_exit_head(self, depth, router_path, exit_head, exit_layer, random_routers):
        """A trained draft head (or its file), or an untrained one at exit_layer (default: the middle)."""
        if depth is not None:
            raise ValueError(f"router='exit_head' takes exit_layer=l (the layer its head reads), not depth={depth} "
                             "(fixed's group count).")
        if exit_head is None and router_path is not None:
            exit_head, self.file = load_exit_head(router_path, self.model, TUNE_COMMAND)
        self._refuse_untrained(exit_head is not None, self.keep_ratio == 1.0, random_routers)
        layer = len(self.layers) // 2 if exit_layer is None else exit_layer
        self.exit_head = (exit_head or new_exit_head(self.model, layer)).eval().to(self.embed.weight.device)
        self.head_weight, self.head_vocab = head_rows(self.lm_head, self.exit_head.vocab)
        return self.exit_head

    def _setup_calm(self, R, base_layers, threshold, bias):
        """confidence, entropy (CALM): threshold is a top-1 probability / an entropy in nats."""
        if bias is not None:
            raise ValueError(f"bias={bias} is a trained router's logit bias; router={self.router!r} stops on "
                             "threshold= (confidence: a top-1 probability; entropy: nats).")
        self._group_units(group_layout(len(self.layers), R, base_layers))
        self.threshold = DEFAULT_THRESHOLD[self.router] if threshold is None else float(threshold)
        if (self.router == "confidence" and not 0 < self.threshold <= 1) or (
                self.router == "entropy" and self.threshold < 0):
            raise ValueError(f"threshold={self.threshold} for router={self.router!r}: confidence takes a top-1 "
                             "probability in (0, 1], entropy nats >= 0.")
        self._stops = self._stops_confidence if self.router == "confidence" else self._stops_entropy

    def _setup_trained(self, R, base_layers, threshold, bias, router_path, routers, exit_threshold, exits,
                       random_routers):
        """skip, ffn, expert_choice, token_choice: trained gates (a FrozenRouters, or its file) decide with bias,
        or at keep_ratio < 1 with a calibrated cutoff per unit; skip / ffn may carry exit gates and stand-ins."""
        kind, L = self.router, len(self.layers)
        if threshold is not None:                                 # the old name, for one release
            warnings.warn(f"threshold={threshold} for router={kind!r} is its logit bias: pass bias={threshold} "
                          "(threshold is CALM's).", FutureWarning, 3)
            bias = threshold if bias is None else bias
        if router_path is not None:
            routers, self.file = load_routers(router_path, self.model.config, TUNE_COMMAND, random_routers)
        if routers is not None and routers.kind != kind:
            raise ValueError(f"{router_path or 'routers='} holds {routers.kind!r} routers: use router={routers.kind!r} "
                             "with them.")
        everyone = self.keep_ratio == 1.0 and kind != "token_choice"        # capacity 1: nothing is routed
        self._refuse_untrained(routers is not None, everyone, random_routers)
        self.random_routers |= bool(self.file and unready(self.file, router_path))   # allowed by random_routers
        if kind in GROUP_ROUTERS:
            self._group_units(routers.units if routers is not None else group_layout(L, R, base_layers))
        else:
            self.units = routers.units if routers is not None else unit_layout(L)
            self.layers_per_depth = list(range(L + 1))
        if routers is None:                           # random_routers: gates whose decisions vary from token to token
            routers = FrozenRouters(kind, self.hidden_size, self.units, mlp_hidden=16)
            for gate in routers.gates:
                nn.init.normal_(gate.net[-1].weight)
                nn.init.zeros_(gate.net[-1].bias)
        self.routers = routers.to(self.embed.weight.device).eval()
        if routers.stand_ins is not None:                                     # by their weights' share
            self.stand_in_share = n_weights(routers.stand_ins[0]) / self.layer_weights
        self._setup_healing(routers, everyone)
        self.bias = float(self.file.get("bias", 0.0) if bias is None else bias)
        self._setup_cutoffs(everyone, router_path)
        et = float(self.file.get("exit_threshold", 0.9) if exit_threshold is None else exit_threshold)
        if not 0.0 < et <= 1.0:
            raise ValueError(f"exit_threshold={et}: a token exits when its exit gate's probability is above it, "
                             "so it lies in (0, 1] (1 = never).")
        self.exit_threshold, self.exit_cutoff = et, math.log(et / (1 - et)) if et < 1 else math.inf
        self.use_exits = bool(exits and self.routers.exit_layers and self.file.get("exits_trained", True))
        self.unit_of = routers.unit_of if kind in ("skip", "ffn") else {}     # per-unit gates: decision 2
        self._stops = {"expert_choice": self._stops_expert_choice, "token_choice": self._stops_token_choice}.get(
            kind, self._stops_exit_gates)

    def _setup_healing(self, routers, everyone):
        """The file's healing, off at full depth (keep_ratio 1.0: the model itself). Its cost counts like a
        layer's, by its weights' share: a healed layer costs heal_attn_share more for each token that runs its
        attention, heal_mlp_share more for each that runs its MLP, and its K/V fill kv_share's K/V corrections
        more (every layer a token can pass over is healed, so every K/V-only fill is)."""
        self.heal = {} if everyone else routers.healing()
        if not self.heal:
            return
        heal, W = next(iter(self.heal.values())), self.layer_weights
        self.heal_attn_share = heal.share(("q_proj", "k_proj", "v_proj", "o_proj"), W)
        self.heal_mlp_share = heal.share(("gate_proj", "up_proj", "down_proj"), W)
        self.kv_share += heal.share(("k_proj", "v_proj"), W)
        self.healed_rows = torch.tensor([float(l in self.heal) for l in range(len(self.layers))],
                                        device=self.embed.weight.device)[:, None]   # (L, 1)

    def _setup_cutoffs(self, everyone, router_path):
        """keep_ratio: every unit open (1.0), or the file's calibrated cutoffs (else calibrate())."""
        if everyone:
            self.cutoffs = torch.full((len(self.units),), -math.inf)
        elif self.keep_ratio is not None:
            if self.router == "token_choice":
                raise ValueError("keep_ratio is a per-unit capacity (skip, ffn, expert_choice); token-choice "
                                 "picks a depth once: move its compute with bias instead.")
            table = self.file.get("cutoffs", {})              # tune.py: keep_ratio -> per-unit cutoffs
            if f"{self.keep_ratio:.2f}" in table:
                self.cutoffs = torch.tensor(table[f"{self.keep_ratio:.2f}"])
            elif self.file:                                    # tune.py adds them (DepthAdapter.calibrate)
                raise ValueError(f"{router_path} has cutoffs for keep_ratio {', '.join(sorted(table)) or '(none)'} "
                                 f"only: use one of those, or add {self.keep_ratio} to the file with python tune.py "
                                 f"--init_from={router_path} --max_iters=0 --keep_ratios={self.keep_ratio}")

    # --- one layer: HF's sub-modules and weights, our cache and attention --------------------------------------
    def _heads(self, y, norm):                          # (..., n * hd) -> (..., n, hd), Qwen3's per-head norm
        y = y.unflatten(-1, (-1, self.head_dim))
        return y if norm is None else norm(y)

    @staticmethod
    def _proj(linear, x, heal, name):                   # a projection, healed (Healing) when heal is given
        return linear(x) if heal is None else linear(x) + heal(name, x)

    def _kv(self, attn, a, cos, sin, heal=None):        # normed input (..., C) -> k, v (..., n_kv, hd), k rotated
        k = apply_rope(self._heads(self._proj(attn.k_proj, a, heal, "k_proj"), getattr(attn, "k_norm", None)),
                       cos, sin)
        return k, self._heads(self._proj(attn.v_proj, a, heal, "v_proj"), None)   # Qwen2's q/k/v biases: in Linear

    def _mlp(self, mlp, h, heal):                        # HF's MLP, or Llama's MLP with each projection healed
        if heal is None:
            return mlp(h)
        gate, up = self._proj(mlp.gate_proj, h, heal, "gate_proj"), self._proj(mlp.up_proj, h, heal, "up_proj")
        return self._proj(mlp.down_proj, mlp.act_fn(gate) * up, heal, "down_proj")

    def _layer(self, c, l, x, attn_set, mlp_set, heal=None):
        """Decoder layer l. x (B*T, C). Every token writes its K/V (the K/V rule); attn_set runs attention and
        mlp_set the MLP (ActiveSets; None: nobody). heal: the layer's Healing, or None. A compiled decode step runs
        what everyone (or nobody) runs with the compiled _decode_layer: the decisions stay here, in Python,
        and a layer nobody runs costs its K/V."""
        layer = self.layers[l]
        if c.compiled and self.compiled_layer is not None and all(s is None or s is c.everyone
                                                                  for s in (attn_set, mlp_set)):
            return self.compiled_layer(layer, x, c.cache.k[l], c.cache.v[l], c.whole_cache_mask(self.windows[l]),
                                       c.cos, c.sin, c.slot, attn_set is not None, mlp_set is not None, heal)
        attn = layer.self_attn
        a = layer.input_layernorm(x)
        k, v = self._kv(attn, a, c.cos, c.sin, heal)                          # (B*T, n_kv, hd)
        self_k, self_v = c.cache.k[l], c.cache.v[l]                           # (B, n_kv, max_len, hd)
        self_k[:, :, c.start:c.end] = k.unflatten(0, (c.B, c.T)).transpose(1, 2)
        self_v[:, :, c.start:c.end] = v.unflatten(0, (c.B, c.T)).transpose(1, 2)
        if attn_set is not None:                                              # before attending: a token sees itself
            cos, sin = c.take(c.cos, attn_set), c.take(c.sin, attn_set)
            q = self._proj(attn.q_proj, c.take(a, attn_set), heal, "q_proj")
            q = apply_rope(self._heads(q, getattr(attn, "q_norm", None)), cos, sin)
            o = c.attend(l, q, attn_set, attn.scaling, self.windows[l])      # (N, H, hd)
            x = c.put(x, attn_set, c.take(x, attn_set) + self._proj(attn.o_proj, o.flatten(-2), heal, "o_proj"))
        if mlp_set is not None:
            h = c.take(x, mlp_set)
            x = c.put(x, mlp_set, h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), heal))
        return x

    # --- the decisions --------------------------------------------------------------------------------------
    @staticmethod
    def _on(fn, x, mask, fill):
        """fn over the tokens where mask is True -> (B*T,) values, `fill` elsewhere."""
        if mask.numel() == 1:                                                 # decode at batch 1: no gather
            return fn(x).float().view(1) if bool(mask) else x.new_full((1,), fill, dtype=torch.float32)
        out = x.new_full(mask.shape, fill, dtype=torch.float32)
        idx = mask.nonzero()[:, 0]
        if idx.numel():
            out[idx] = fn(x[idx]).float().reshape(idx.numel(), -1)[:, 0]
        return out

    # decision 1 (does a token stop at layer l?), one small rule per family, chosen once in __init__:
    # -> (B*T,) bool of the alive tokens that stop here, or None (no decision at this layer)
    def _stops_confidence(self, l, x, alive, c, carry):   # CALM: the state so far is sure of its top token
        return self._calm(l, x, alive, c, lambda logp: logp.max(-1).values.exp() >= self.threshold)

    def _stops_entropy(self, l, x, alive, c, carry):      # CALM: ... or its distribution is flat enough
        return self._calm(l, x, alive, c, lambda logp: -(logp.exp() * logp).sum(-1) <= self.threshold)

    def _calm(self, l, x, alive, c, sure):
        """At a group start: the alive tokens' logits so far, tested by `sure`."""
        if l not in self.unit_at:
            return None
        c.head_checks += int(alive.sum())
        test = lambda h: sure(F.log_softmax(self.lm_head(self.norm(h)).float(), -1)).float()
        return self._on(test, x, alive, 0.0) > 0

    def _stops_token_choice(self, l, x, alive, c, carry):
        """One choice after base_layers: depth d runs units 0..d-1 (argmax_d of logit_d - bias * d)."""
        u = self.unit_at.get(l)
        if u is None:
            return None
        if u == 0:
            bias = min(max(self.bias, -1e9), 1e9)                             # finite: 0 * inf would be nan
            penalty = bias * torch.arange(self.n_units + 1, device=x.device)
            carry["depth"] = self._on(lambda h: (self.routers.gates[0](h) - penalty).argmax(-1), x, alive, 0.0)
        return alive & (carry["depth"] <= u)

    def _stops_expert_choice(self, l, x, alive, c, carry):   # a gate per group: stay or stop for good
        u = self.unit_at.get(l)
        return None if u is None else alive & ~self._passes(u, x, alive, c)

    def _stops_exit_gates(self, l, x, alive, c, carry):      # skip / ffn: trained exit gates, if any
        rs = self.routers
        if not self.use_exits or l not in rs.exit_at:
            return None
        return alive & (self._on(rs.exits[rs.exit_at[l]], x, alive, -math.inf) > self.exit_cutoff)

    def _passes(self, u, x, alive, c):
        """Gate u over the alive tokens -> (B*T,) bool: logit > the unit's cutoff (else bias). A calibrating pass
        sets the cutoff first (calibrate)."""
        z, cutoffs = self._on(self.routers.gates[u], x, alive, -math.inf), c.cache.cutoffs
        if c.calibrating:
            keep = (group_keep(self.keep_ratio, len(self.routers.gates)) if self.router == "expert_choice"
                    else self.keep_ratio)
            cutoffs[u] = torch.quantile(z[alive], 1.0 - keep) if bool(alive.any()) else math.inf
        return alive & (z > (self.bias if cutoffs is None else cutoffs[u]))

    # --- the one loop ----------------------------------------------------------------------------------------
    def forward_chunk(self, cache, ids, pos, start, all_logits=False):
        """The prefill, a decode step or a verify pass: ids, pos (B, T) fill cache slots start..start+T, each token
        through its router's layers. -> Pass."""
        B, T = ids.shape
        x = self.embed(ids)                                                   # (B, T, C)
        cos, sin = self.rotary(x, pos)                                        # (B, T, hd) each
        cache.pos[:, start:start + T] = pos
        c = _Chunk(cache, start, B, T, cos, sin)
        x = x.flatten(0, 1)                                                   # (B*T, C): one row per token
        if self.static_layers is not None:                                    # static: every token, the same layers
            for l in self.static_layers:
                x = self._layer(c, l, x, c.everyone, c.everyone)
            depth = torch.full((B * T,), self.static_depth, device=x.device)
            cost, kv_only = torch.full((B * T,), float(len(self.static_layers)), device=x.device), 0
        else:
            x, depth, cost, kv_only = self._routed(c, x)
            cache.calibrate_next = False
        h = x.unflatten(0, (B, T))
        head = self.compiled_head if c.compiled and self.compiled_head is not None else self._logits
        return Pass(head(h if all_logits else h[:, -1]), depth.view(B, T), cost.view(B, T), h, kv_only,
                    c.head_checks)

    def _routed(self, c, x):
        """The routed kinds' layer loop: decision 1, decision 2, then the layer on the tokens that run it, packed.
        -> (x, depth, cost, kv_only) per token."""
        one_token = c.compiled and c.B == 1 and self.compiled_layer is not None and not c.calibrating
        if one_token and self.router in ("skip", "ffn", "expert_choice") and not self.use_exits:   # batch-1 decode
            return self._routed_one(c, x)
        alive = c.valid.clone()                       # (B*T,) not stopped; padding never runs
        carry, unit_go, last, sets, ran, groups, stood = {}, None, (None, None), (None, None), [], [], []
        for l in range(len(self.layers)):
            if l == self.tail_start:                                          # the tail: every token again
                alive = c.valid
            stop = self._stops(l, x, alive, c, carry)                        # decision 1: stop here?
            if stop is not None:
                alive = alive & ~stop
                groups.append(alive)                                          # a group starts: who runs it
            u = self.unit_of.get(l)
            if u is not None and self.units[u][0] == l:                       # decision 2: run this unit?
                unit_go = self._passes(u, x, alive, c) & alive
            go = alive if u is None else unit_go
            masks = (alive, go) if self.attn_always else (go, go)             # ffn: attention always runs
            if masks[0] is not last[0] or masks[1] is not last[1]:            # routing changed: repack (host sync)
                attn_set = sets[0] if masks[0] is last[0] else c.subset(masks[0])
                sets = attn_set, attn_set if masks[1] is masks[0] else c.subset(masks[1])
                last = masks
            x = self._layer(c, l, x, *sets, self.heal.get(l))
            ran.append(masks)
            if u is not None and self.routers.stand_ins is not None and l == self.units[u][1] - 1:
                stood.append(alive & ~unit_go)                                # passed over: the unit's stand-in
                idx = stood[-1].nonzero()[:, 0]
                if idx.numel():                                               # none: adds nothing, costs nothing
                    x = x.index_add(0, idx, self.routers.stand_ins[u](x[idx]))
        return (x, *self._tally(c, *(torch.stack([m[i] for m in ran]).float() for i in (0, 1)),
                                torch.stack(stood).float() if stood else None, groups))

    def _routed_one(self, c, x):
        """_routed for ONE token on compiled layers (batch-1 decode; skip, ffn without exit gates, expert_choice).
        Every decision is a Python bool, and the compiled call of the layer before a unit also runs that unit's gate
        (and a stand-in where one is due): one compiled call per layer, nothing else, so a passed-over layer saves
        its time but its K/V. The same decisions as _routed: gate logit > the unit's cutoff (else bias)."""
        cut = c.cache.cutoffs if c.cache.cutoffs is not None else torch.full((len(self.units),), self.bias)
        cut = cut.float().tolist()                                            # _passes compares in float32
        rs, groups = self.routers, self.router == "expert_choice"            # groups: once out, out until the tail
        alive, go, attn_ran, mlp_ran, stood, ran_groups = True, True, [], [], [], []
        z = float(rs.gates[self.unit_at[0]](x)) if 0 in self.unit_at else None
        for l, layer in enumerate(self.layers):
            u = self.unit_at.get(l) if groups else self.unit_of.get(l)
            if l == self.tail_start:
                alive = True
            if groups and u is not None:                                      # decision 1: stop here for good?
                alive = alive and z > cut[u]
                ran_groups.append(alive)
            elif u is not None and l == self.units[u][0]:                     # decision 2, from the last call
                go = z > cut[u]
            run = alive if groups else u is None or go
            stand = None
            if not groups and u is not None and rs.stand_ins is not None and l == self.units[u][1] - 1:
                stood.append(not run)
                stand = None if run else rs.stand_ins[u]
            nxt = self.unit_at.get(l + 1) if alive else None                  # a stopped token needs no gate
            out = self.compiled_layer(layer, x, c.cache.k[l], c.cache.v[l], c.whole_cache_mask(self.windows[l]),
                                      c.cos, c.sin, c.slot, run or self.attn_always, run, self.heal.get(l), stand,
                                      None if nxt is None else rs.gates[nxt])
            x, z = (out[0], float(out[1])) if nxt is not None else (out, z)
            attn_ran.append(run or self.attn_always)
            mlp_ran.append(run)
        col = lambda bools: torch.tensor(bools, dtype=torch.float32, device=x.device)[:, None]   # (n, 1)
        return (x, *self._tally(c, col(attn_ran), col(mlp_ran), col(stood) if stood else None,
                                [torch.tensor([g], device=x.device) for g in ran_groups]))

    def _tally(self, c, attn_ran, mlp_ran, stood, groups):
        """The bookkeeping, once per call: attn_ran, mlp_ran (L, B*T) float, who ran attention / the MLP at each
        layer; stood (units, B*T) who got a unit's stand-in, or None; groups: each group's runners (group kinds).
        -> (depth, cost, kv_only) per token."""
        cost = self.attn_share * attn_ran.sum(0) + (1 - self.attn_share) * mlp_ran.sum(0)
        if stood is not None:                                                 # stand-ins, by their weights' share
            cost = cost + self.stand_in_share * stood.sum(0)
        if self.heal:                                                         # healing too (_setup_healing)
            cost = cost + (self.heal_attn_share * (attn_ran * self.healed_rows).sum(0)
                           + self.heal_mlp_share * (mlp_ran * self.healed_rows).sum(0))
        kv_only = int((c.valid & (attn_ran == 0)).sum())                      # K/V written, nothing else run
        depth = (torch.stack(groups).long().sum(0) if self.counts_groups      # groups run
                 else mlp_ran.sum(0).long())                                  # layers (ffn: MLPs) run
        return depth, cost, kv_only

    def decode_step(self, cache, tok, pos, slot):
        """tok, pos (B,): one token per row into cache slot `slot` -> Pass (logits (B, V)); or (B, T): a short chunk
        into slots slot.. (speculative decoding's verify pass) -> Pass (every position's logits, (B, T, V)). A
        compiled cache runs a static plan's _static_step (a graph for each T up to 8 rows, then one for any T:
        torch.compile's automatic dynamic shapes), else forward_chunk (on compiled layers at T = 1)."""
        one = tok.dim() == 1
        ids, pos = (tok[:, None], pos[:, None]) if one else (tok, pos)
        if not cache.static or self.static_layers is None:
            return self.forward_chunk(cache, ids, pos, slot, all_logits=not one)
        (B, T), dev = ids.shape, ids.device
        cache.pos[:, slot:slot + T] = pos
        slots = torch.arange(slot, slot + T, device=dev)
        if B * T <= 8:               # a graph per width: on a CPU its rows unroll (data.few_rows_linear, FEW_ROWS)
            for t in (ids, pos, slots):
                torch._dynamo.mark_static(t, -1)
        logits, h = self.compiled_step(cache.k, cache.v, cache.key_valid, ids, pos, slots)
        return Pass(logits[:, 0].clone() if one else logits.clone(), torch.full((B, T), self.static_depth, device=dev),
                    torch.full((B, T), float(len(self.static_layers)), device=dev), h.clone(), 0, 0)

    def _static_step(self, k, v, key_valid, ids, pos, slot):
        """A static kind's decode step (or verify chunk) with shapes that never change, what torch.compile captures
        whole (fullgraph; a CUDA graph on a GPU). ids, pos (B, T); slot (T,) their cache slots; k, v, key_valid the
        cache's pooled buffers. As in gpt-fast, attention reads the WHOLE cache under a mask (valid, slot <= the
        query's) and index_copy_ writes the new K/V: no Python int changes between steps. -> logits (B, T, V), the
        final states (B, T, C) before the final norm (a drafter's input)."""
        x = self.embed(ids)                                                   # (B, T, C)
        cos, sin = self.rotary(x, pos)                                        # (B, T, hd)
        masks = {}
        for l in self.static_layers:
            w = self.windows[l]
            if w not in masks:                                                # (B, 1, T, S) bool
                masks[w] = decode_mask(key_valid, slot, w)
            x = self._decode_layer(self.layers[l], x, k[l], v[l], masks[w], cos, sin, slot)
        return self._logits(x), x

    def _decode_layer(self, layer, x, k, v, mask, cos, sin, slot, attn_on=True, mlp_on=True, heal=None,
                      stand_in=None, gate=None):
        """One decoder layer for one token per row, x (B, C), or a short chunk, x (B, T, C): its K/V into cache slots
        `slot` (T,) of k, v (B, n_kv, S, hd) (index_copy_), then attention over the whole cache under `mask` if
        attn_on, the MLP if mlp_on; heal: the layer's Healing. Batch-1 routed decode (_routed_one) adds what comes
        between layers: a stand-in (the token passed over the unit ending here) and the next unit's gate (-> (x,
        logit (B, 1)) instead of x). torch.compile makes one graph per combination, shared by every layer of the
        model (the weights are inputs)."""
        attn, B = layer.self_attn, x.shape[0]
        by_head = lambda t: t.reshape(B, -1, *t.shape[-2:]).transpose(1, 2)  # (B, [T,] n, hd) -> (B, n, T, hd)
        a = layer.input_layernorm(x)
        kk, vv = self._kv(attn, a, cos, sin, heal)                            # (B, [T,] n_kv, hd)
        k.index_copy_(2, slot, by_head(kk).to(k.dtype))
        v.index_copy_(2, slot, by_head(vv).to(v.dtype))
        if attn_on:
            q = self._proj(attn.q_proj, a, heal, "q_proj")
            q = apply_rope(self._heads(q, getattr(attn, "q_norm", None)), cos, sin)   # (B, [T,] H, hd)
            o = decode_attention(by_head(q), k, v, mask, attn.scaling)       # (B, H, T, hd)
            x = x + self._proj(attn.o_proj, o.transpose(1, 2).reshape(x.shape[:-1] + (-1,)), heal, "o_proj")
        if mlp_on:
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x), heal)
        if stand_in is not None:
            x = x + stand_in(x)
        return x if gate is None else (x, gate(x))

    def _logits(self, h):
        """The model's final norm and LM head, or the trained exit head's (a token outside its vocab gets -inf)."""
        if self.exit_head is None:
            return self.lm_head(self.norm(h))
        return spread(self.exit_head(h, self.head_weight), self.head_vocab, self.lm_head.weight.shape[0])

    # --- generation ------------------------------------------------------------------------------------------
    def new_cache(self, input_ids, attention_mask=None, max_new_tokens=0, extra=0, compile=False):
        """The checks and the cache for input_ids (B, T0), left-padded where attention_mask has zeros, with room for
        max_new_tokens and `extra` slots (speculative decoding: a realigned row verifies past its end). compile:
        decode compiled: a static plan's step whole (_static_step), a routed kind's layers (_decode_layer), the
        decisions eager. -> (cache, ids on the device, pos (B, T0), mask (B, T0))."""
        dev = self.embed.weight.device
        ids = input_ids.to(dev)
        B, T0 = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(dev).bool()
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be LEFT padding (zeros then ones, every row ending in a token); "
                             "set tokenizer.padding_side = 'left'.")
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        if ctx and T0 + max_new_tokens > ctx:
            raise ValueError(f"the prompt is {T0} tokens and {max_new_tokens} more are asked for, but the model's "
                             f"context is {ctx} positions: shorten the prompt or ask for fewer tokens.")
        if compile:
            self.compile()
        key_valid = torch.ones(B, T0 + max_new_tokens + extra, dtype=torch.bool, device=dev)
        key_valid[:, :T0] = mask
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)                        # HF's position ids under left padding
        return AdapterCache(self, B, T0 + max_new_tokens + extra, key_valid, compile), ids, pos, mask

    def _summary(self, depth, cost, kv_only, head_checks):
        """router.depth_summary of the tokens given, with the layer calls they made (layer-equivalents) and the
        K/V-only fill."""
        stats = depth_summary(depth, self.layers_per_depth)
        L = len(self.layers)
        stats["layer_calls"] = float(cost.sum())
        stats["compute_saved_pct"] = 100.0 * (1 - stats["layer_calls"] / max(stats["tokens"] * L, 1))
        stats["layer_calls_full"] = stats["tokens"] * L
        stats.update(kv_only_layer_calls=kv_only, kv_share=self.kv_share, attn_share=self.attn_share,
                     head_checks=head_checks, head_share=self.head_share)
        return stats

    @torch.no_grad()
    def calibrate(self, windows):
        """skip / ffn / expert_choice at keep_ratio < 1: in one prefill of calibration text `windows` (N, T), set
        each unit's cutoff to the (1 - keep_ratio) quantile of its gate logits over the tokens that reach it.
        Routing is then causal (prefill equals decode), keeping about keep_ratio on text like this. -> cutoffs."""
        if self.router not in ("skip", "ffn", "expert_choice") or self.keep_ratio in (None, 1.0):
            raise ValueError(f"calibrate() sets keep_ratio's cutoffs (skip, ffn, expert_choice at keep_ratio < 1); "
                             f"router={self.router!r} at keep_ratio={self.keep_ratio} has none.")
        self.cutoffs = None
        cache, ids, pos, _ = self.new_cache(windows)
        self.forward_chunk(cache, ids, pos, 0)
        self.cutoffs = cache.cutoffs.cpu()
        return self.cutoffs

    @torch.no_grad()
    def prefill_logits(self, input_ids, attention_mask=None):
        """Teacher forcing: every position's logits (B, T, V) float32, and stats over the non-pad tokens. Prefill
        equals decode for every router (causal decisions), so a perplexity from here is what generation sees."""
        if self.keep_ratio is not None and self.cutoffs is None and self.router in ROUTER_KINDS:
            raise ValueError("prefill_logits needs causal routing, and keep_ratio < 1 without calibrated cutoffs "
                             "would take them from this very text: call calibrate(windows) first.")
        cache, ids, pos, mask = self.new_cache(input_ids, attention_mask)
        out = self.forward_chunk(cache, ids, pos, 0, all_logits=True)
        return out.logits.float(), self._summary(out.depth[mask].cpu(), out.cost[mask].cpu(), out.kv_only,
                                                 out.head_checks)

    def full_depth(self):
        """This model at full depth (router 'none'; made once, so its compiled graphs are kept): speculative
        decoding's verify pass."""
        if self._full is None:
            self._full = DepthAdapter(self.model, no_skip=True)
        return self._full

    def compile(self):
        """torch.compile this adapter's decode steps, once (later calls reuse the graphs): a static plan's step
        whole, a routed kind's layer step (the decisions stay eager). A cache made with compile=True runs them."""
        if self.compiled_layer is None:
            # torch.compile checks a graph's guards at every call: those on the torch.nn modules (Linear, Embedding:
            # their attributes, ~1.7 ms a SmolLM2 step, 8% of it; and a routed step makes ~30 layer calls) are
            # skipped, which is sound because this adapter's layers all share one structure and nothing changes them
            # after loading; the guards on shapes and on the arguments (healing, stand-in, gate, or None) stay.
            # Guards live with the compiled code, so this adapter compiles copies of the methods' code of its own:
            # another model's graphs never run here. On a GPU the static step also replays as a CUDA graph
            # ("reduce-overhead"); the layer step does not: a routed step calls it ~30 times a token, and a replay
            # would overwrite the outputs of the call before.
            opts = {"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}
            cuda = {"triton.cudagraphs": self.embed.weight.device.type == "cuda"}
            self.compiled_step = torch.compile(_own_code(self._static_step), fullgraph=True, options={**opts, **cuda})
            self.compiled_layer = torch.compile(_own_code(self._decode_layer), fullgraph=True, options=opts)
            if self.exit_head is None:                  # the final norm and LM head of a routed step: 21% of its bytes
                self.compiled_head = torch.compile(_own_code(self._logits), fullgraph=True, options=opts)
            # _decode_layer's graphs: one per (attn, MLP, healing, stand-in, gate) that occurs, up to 16 or so
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 eos_token_id=None, return_trace=False, return_logits=False, compile=False, speculative=None,
                 adapt_k=None, lookup=None, on_tokens=None):
        """new_cache, forward_chunk over the prompt, then decode_step per token. input_ids (B, T0), left-padded where
        attention_mask has zeros. compile: decode compiled (the same greedy tokens as eager; new_cache says how).
        on_tokens: called after each step with its new tokens, a list of B 1-D
        tensors (a streamer: sample.py --stream). Speculative decoding: speculative.generate(adapter, ids, K=4).

        -> (output_ids (B, T0 + new), stats): _summary over the decoded tokens (all but the last, never fed back),
        prompt_tokens / prompt_mean_depth, timing_stats, easy/medium/hard (CALM), trace = [(row, column in
        output_ids, depth)] with return_trace, logits (B, new, V) float32 with return_logits. A row that emitted
        eos_token_id repeats it; when all have, generation stops."""
        if speculative is not None or adapt_k is not None or lookup is not None:
            raise ValueError(SPECULATIVE_MOVED)
        cache, ids, pos, mask = self.new_cache(input_ids, attention_mask, max_new_tokens, compile=compile)
        dev, (B, T0) = ids.device, ids.shape
        out = ids.new_empty(B, T0 + max_new_tokens)
        out[:, :T0] = ids
        t0 = now(dev)
        step = prompt = self.forward_chunk(cache, ids, pos, 0)               # the prefill
        t1 = now(dev)
        next_pos, done = pos[:, -1] + 1, torch.zeros(B, dtype=torch.bool, device=dev)
        depths, costs, step_logits, n_new = [], [], [], 0
        kv_only, head_checks = prompt.kv_only, prompt.head_checks
        for i in range(max_new_tokens):
            if return_logits:
                step_logits.append(step.logits.float())
            next_id = sample_next(step.logits, temperature, top_k)[:, 0]      # (B,)
            if eos_token_id is not None:
                next_id = next_id.masked_fill(done, eos_token_id)
                done |= next_id == eos_token_id
            out[:, T0 + i] = next_id
            if on_tokens is not None:
                on_tokens(list(next_id[:, None]))
            n_new = i + 1
            if n_new == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            step = self.decode_step(cache, next_id, next_pos, T0 + i)         # one token per row, slot T0 + i
            depths.append(step.depth)
            costs.append(step.cost)
            kv_only, head_checks, next_pos = kv_only + step.kv_only, head_checks + step.head_checks, next_pos + 1
        t2 = now(dev)
        stats = self._decode_stats(prompt.depth, depths, costs, kv_only, head_checks, mask, n_new, (t0, t1, t2),
                                   return_trace)
        if return_logits:
            stats["logits"] = torch.stack(step_logits, 1)
        return out[:, :T0 + n_new], stats

    def _decode_stats(self, prompt_depth, depths, costs, kv_only, head_checks, mask, n_new, times, return_trace):
        """generate()'s stats: the generated tokens' depths and costs (lists of (B, 1)), the prompt's depths."""
        B, T0 = mask.shape
        gen = torch.cat(depths, 1).cpu() if depths else torch.zeros(B, 0, dtype=torch.long)   # (B, steps)
        stats = self._summary(gen.flatten(), torch.cat(costs, 1).cpu() if costs else torch.zeros(0), kv_only,
                              head_checks)
        prompt_depth = prompt_depth.cpu()[mask.cpu()]
        stats.update(router=self.router, R=self.n_units, base_layers=self.base_layers, batch=B, new_tokens=n_new,
                     prompt_tokens=prompt_depth.numel(), prompt_mean_depth=float(prompt_depth.float().mean()),
                     **timing_stats(B, n_new, times), random_routers=self.random_routers)
        if self.threshold is not None:  # CALM: exit point in the first / middle / last third of the groups (or never)
            frac = gen.float() / self.n_units
            stats.update(easy=int((frac < 1 / 3).sum()), medium=int(((frac >= 1 / 3) & (frac < 2 / 3)).sum()),
                         hard=int((frac >= 2 / 3).sum()))
        if return_trace:
            prompt = [(b, t) for b, t in mask.cpu().nonzero().tolist()]
            stats["trace"] = [(b, t, d) for (b, t), d in zip(prompt, prompt_depth.tolist())] + [
                (b, T0 + i, int(gen[b, i])) for i in range(gen.shape[1]) for b in range(B)]
        return stats


def n_weights(module):
    return sum(p.numel() for p in module.parameters())


def _own_code(method):
    """The bound method with a fresh copy of its code object: torch.compile keeps its graphs and their guards per
    code object, so a compiled copy shares them with nobody (DepthAdapter.compile)."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(g, method.__self__)


def now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timing_stats(B, n_new, times):
    """prefill_s, decode_s, tokens_per_s, ms_per_token from now()'s (start, prefill end, end)."""
    t0, t1, t2 = times
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens_per_s=B * n_new / max(t2 - t1, 1e-9),
                ms_per_token=1000 * (t2 - t1) / max(n_new, 1))

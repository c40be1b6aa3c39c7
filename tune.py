"""
Router tuning for a pretrained Hugging Face model, every base weight frozen; and the speculative drafts'
training (an exit head or a drafter, which speculative.py decodes with).

  python tune.py --hf smollm2-135m --router expert_choice   # the built-in model on its own answers (18-29 min, CPU)
  python tune.py config/hf_smollm2.py --router=ffn           # the longer recipe the README's tables come from
  python tune.py config/hf_router_tune.py                    # a tiny dense model trained and exported here
  python tune.py --hf=path/to/dir --self_distill=0 --dataset=my.txt --target_speedup=1.4
  python tune.py --init_from=<a routers file>                # finish a killed run, from its last save
  python tune.py --help                                      # every key, its default, what it does

What trains: the gates of hf_wrap.FrozenRouters, one kind per run (hf_wrap.py explains each). The tuning forward
blends instead of deciding: unit u's update is scaled by its continue weight w_u, x <- x + w_u * (unit(x) - x)
(ffn: the MLP's update only). The loss: KL to the full model's next-token distribution (or the LM loss) plus a
compute penalty toward target_active_ratio; for skip / ffn the last part of the run is 0/1 forward
(straight-through), so training ends on inference's decisions (the group kinds train soft: KIND_DEFAULTS).
Then, optionally, exit gates (CALM's confidence, learned), each keep_ratio's cutoffs and the bias that gives
target_speedup; hf_wrap.DepthAdapter then really skips the work.
The text is the model's own chat answers (self-distillation), made once and kept next to the routers. All of it
lands in one file: routers-<router>.pt in the model's cache folder (data.default_routers, where sample.py and
bench.py look), or out_dir/routers.pt. It is saved at every evaluation too, marked unfinished until the end (a
killed run resumes from it with --init_from). Every job, the speculative drafts' included, runs through one AdamW
loop, fit().
"""
import contextlib
import functools
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import data
import hf_wrap
import speculative
from data import corpus_ids, load_hf, text_windows, train_val_text
from hf_wrap import DepthAdapter

# -----------------------------------------------------------------------------
hf = "smollm2-135m"             # the frozen base: built-in name, local folder, .gguf file or hub name
out_dir = ""                    # "": routers-<router>.pt in the model's cache folder ($NANOMOR_CACHE or
                                # ~/.cache/nanomor, where sample.py finds it); else out_dir/routers.pt
dataset = "shakespeare"         # self_distill > 0: the words its chat prompts are made of; 0: the text tuned on,
                                # in the model's own tokens. A built-in name or a UTF-8 .txt file
seed = 1337
# the loop: 4 windows * 256 tokens = 1,024 tokens per step; the frozen base runs forward twice (the full model for
# the KL target, the routed one with gradients for the gates; no weight gradients): ~11 s per step on 2 CPU cores
batch_size = 4
block_size = 256
gradient_accumulation_steps = 1
max_iters = 80
eval_interval = 40              # and a save, marked unfinished (init_from resumes it)
eval_iters = 4                  # held-out windows = eval_iters * batch_size (the val split)
log_interval = 10
calib_windows = 16              # train-split windows for the keep_ratio cutoffs and the target search
router = "skip"                 # skip | ffn (MLP only, attention always runs) | expert_choice | token_choice
loss = "kl"                     # kl: match the full model's next-token distribution | lm: the text's next token
# where the gates sit: skip / ffn units (hf_wrap.unit_layout), expert / token-choice groups (hf_wrap.group_layout)
R = 7                           # expert_choice / token_choice: groups after base_layers (30 layers: 7 groups of 4)
base_layers = 2                 # expert_choice / token_choice: layers every token runs
tail_layers = -1                # expert_choice / token_choice: the last layers, run by every token (stopped or not);
                                # -1: the router kind's default (KIND_DEFAULTS: 2 for these, else 0)
router_pattern = "every"        # every | every_other: which units in router_start..router_stop get a skip gate
router_start = 1                # first routed layer (>= 1: layer 0 always runs)
router_stop = -1                # routed layers stop before this one; < 0 counts from the end (-1: last layer locked on)
router_group = 1                # layers per routed unit (one gate skips them together)
router_mlp_hidden = 64          # gate MLP width (0 = a linear gate)
stand_in_rank = 0               # skip / ffn: > 0: a trained stand-in of this rank for the tokens that skip a unit,
                                # x + (1 - w_u) * stand_in_u(x) (hf_wrap.StandIn, FlexiDepth's adapter)
heal_rank = 0                   # > 0: healing, a LoRA of this rank on the 7 projections of every layer from the
                                # first routed one on (hf_wrap.Healing), trained with the gates; 0 = plain routing
heal_learning_rate = 1e-3       # the healing's peak rate (the gates' schedule, scaled)
# the loss: KL (or LM) + lambda * max(mean weight - target_active_ratio, 0) + gate_entropy_weight * entropy
target_active_ratio = 0.7       # compute budget: the mean continue weight over routed layers and tokens
penalty_weight = 2.0            # lambda
penalty_warmup_iters = 10       # lambda = 0 before this iteration
gate_entropy_weight = 0.1       # > 0 pushes soft weights toward 0/1, closer to the decisions made at inference
hard_gate_frac = -1.0           # the last fraction of max_iters runs 0/1 gates forward (straight-through gradients);
                                # without it soft gates learn "run every layer at partial strength" (README table);
                                # -1: the router kind's default (KIND_DEFAULTS: 0.5 for skip / ffn, 0 for the rest)
# AdamW on the router parameters only, warmup then cosine (configurator.lr_at)
learning_rate = 5e-3            # only ~100k router parameters: a high rate is fine
min_lr = 5e-4
warmup_iters = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # 0 = off
# phase 2: exit gates, routers frozen
exit_layers = ()                # exit gates at these layers' inputs, e.g. (4, 6, 8); () = none
exit_iters = 0                  # exit-gate training steps (0 = no exits)
exit_threshold = 0.9            # a token exits when its exit gate's probability is above this
# last: keep_ratio cutoffs, and the bias that gives a compute target, by bisection on calibration text
keep_ratios = (0.5, 0.6, 0.7, 0.8, 0.9)   # skip / ffn / expert_choice: calibrated (init_from: the file's too)
target_speedup = 0.0            # > 0: search the bias for 1/target_speedup of the layer calls (0 = off)
target_mean_layers = 0.0        # or a target mean of layers per token (0 = off)
target_tol = 0.005              # the search stops within this of the target layer-call ratio
# a speculative draft instead of gates: an exit head (hf_wrap.ExitHead)
exit_head_layer = 0             # > 0: tune an exit head that reads the state entering this layer (0 = gates)
exit_head_rank = 128            # its low-rank residual adapter's width
# or a drafter (speculative.Drafter) on the full model's final state
drafter = False                 # True: tune a drafter
drafter_hidden = 512            # its MLP's width
drafter_steps = 3               # tokens ahead it is trained to draft in a row (each from its own previous state)
drafter_text = ""               # a dataset whose plain text also trains it: pydoc | shakespeare | a .txt path
# either draft
draft_vocab = 8192              # tokens a draft can propose: the tuning text's most frequent (0 = all)
draft_windows = 256             # train-split windows whose frozen-base states are computed once, then reused
exit_head_vocab = -1            # old name of draft_vocab (RENAMED below; -1: unset)
exit_head_windows = -1          # old name of draft_windows
# the text: the model's own answers (self-distillation: routers keep what the full model does on what it says), made
# once and kept next to the routers (self_distill-<settings>.npz), or the dataset's text (self_distill=0)
self_distill = 128              # > 0: the model's answers to this many chat prompts made of the dataset's words
self_distill_tokens = 128       # new tokens per answer
self_distill_temperature = 0.7  # their sampling temperature (top-k 50); 0 = greedy
self_distill_batch = 16         # answers generated at once
init_gates = "budget"           # budget: every gate at target_active_ratio | influence (skip / ffn): ShortGPT's
                                # static drop (the units of lowest block influence off, the rest on)
init_from = ""                  # a routers file: its settings and gates, with this run's changes to tune.py's
                                # defaults on top. Unfinished (killed): resumes it, with its own settings.
                                # --max_iters=0 --keep_ratios=...: add cutoffs; with exit_layers: add exit gates
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"                  # auto (bf16 on CUDA, else float32) | float32 | bfloat16 | float16
threads = 0                     # CPU threads (0: torch's default); 1 is often much faster on a busy shared machine
# -----------------------------------------------------------------------------
_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, configurator.CONFIG_TYPES)}


# Each router kind's values for the keys above left at -1. A group router's stopped token skips every later layer:
# with 0/1 gates in training its gates shut (tune.py warns), and without the last layers, which turn a state into a
# prediction, the text breaks. So the group kinds train soft, and every token runs the last two layers.
KIND_DEFAULTS = {"skip": {"hard_gate_frac": 0.5, "tail_layers": 0}, "ffn": {"hard_gate_frac": 0.5, "tail_layers": 0},
                 "expert_choice": {"hard_gate_frac": 0.0, "tail_layers": 2},
                 "token_choice": {"hard_gate_frac": 0.0, "tail_layers": 2}}


def default_config(**overrides):
    """The settings above as a dict, with overrides: what tune_routers takes (tests and callers start here)."""
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown tuning keys {sorted(unknown)}; the keys are {sorted(_DEFAULTS)}")
    return {**_DEFAULTS, **overrides}


# -----------------------------------------------------------------------------
# The tuning forward (soft gates) and its loss

def _causal_mask(T, window, like):
    """(1, 1, T, T) additive mask for a whole sequence: causal, and inside the sliding window if any."""
    i = torch.arange(T, device=like.device)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok = ok & (i[None, :] > i[:, None] - window)
    return torch.zeros(T, T, dtype=like.dtype, device=like.device).masked_fill_(~ok, -math.inf)[None, None]


def soft_forward(model, routers, ids, influence=None, hard=False):
    """The tuning forward (module docstring) through HF's own layers, healed while routers carry healing
    (FrozenRouters.healed); w_u (B, T, 1) is read from the state entering unit u and weighs each of its layers'
    updates, so at 0/1 a stopped token keeps its state through the unit and writes its K/V from it, as in the
    adapter. routers=None: the model itself. ids (B, T) -> logits (B, T, V), weights (B, T, U) float32 (or None),
    {exit layer: its input state (B, T, C)}. influence: a list to append, per layer, sum over tokens of
    1 - cos(x_in, x_out). hard: 0/1 weights forward, the soft ones' gradient backward."""
    inner = model.model
    B, T = ids.shape
    x = inner.embed_tokens(ids)                                               # (B, T, C)
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    rope = inner.rotary_emb(x, pos)                                           # (cos, sin) (B, T, hd) each
    masks, weights, states, carry = {}, [], {}, None
    with contextlib.nullcontext() if routers is None else routers.healed(inner.layers):
        for l, layer in enumerate(inner.layers):
            if routers is not None and l in routers.exit_at:
                states[l] = x
            u = None if routers is None else routers.unit_of.get(l)
            if u is not None and routers.units[u][0] == l:                    # a unit starts: its weight, its input
                w, carry = routers.continue_weights(u, x, carry, hard)
                weights.append(w)
                w, x_unit = w.to(x.dtype), x
            window = hf_wrap.layer_window(model.config, l)
            if window not in masks:
                masks[window] = _causal_mask(T, window, x)
            x_in = x
            if u is not None and routers.kind == "ffn":                       # attention in full, the MLP weighted
                h = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=masks[window],
                                        position_ids=pos, position_embeddings=rope)[0]
                x = h + w * layer.mlp(layer.post_attention_layernorm(h))
                if routers.stand_ins is not None:                             # the MLP's stand-in, for the rest
                    x = x + (1 - w) * routers.stand_ins[u](h)
            else:
                x = layer(x, attention_mask=masks[window], position_ids=pos, position_embeddings=rope)
            if influence is not None:
                influence.append(float((1 - F.cosine_similarity(x_in.float(), x.float(), dim=-1)).sum()))
            if u is not None and routers.kind != "ffn":
                x = x_in + w * (x - x_in)                                     # the layer's update, weighted
                if routers.stand_ins is not None and l == routers.units[u][1] - 1:
                    x = x + (1 - w) * routers.stand_ins[u](x_unit)            # the unit's stand-in, for the rest
    logits = model.get_output_embeddings()(inner.norm(x))
    return logits, (torch.cat(weights, -1).float() if weights else None), states


def _kl(logits_p, logits_q):
    """KL(p || q) per row, and log q: p and q from logits over the same vocabulary."""
    logp, logq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1), logq


def _tuning_loss(logits, Y, weights, cfg, it, sizes=None, full_logits=None):
    """The loss above the settings: KL(full || routed) when full_logits are given, else the LM loss on Y. The
    mean weight pools every unit and token, each unit counted by its layers (sizes): the routers choose WHICH
    units to skip for which tokens; only the average is held to the budget. -> (loss, {name: float})."""
    if full_logits is not None:
        fit = _kl(full_logits, logits)[0].mean()
    else:
        fit = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten())
    sizes = torch.ones(weights.shape[-1], device=weights.device) if sizes is None else sizes
    mean_w = (weights * sizes).sum(-1).mean() / sizes.sum()
    lam = cfg["penalty_weight"] if it >= cfg["penalty_warmup_iters"] else 0.0
    penalty = F.relu(mean_w - cfg["target_active_ratio"])
    w = weights.clamp(1e-6, 1 - 1e-6)
    entropy = -(w * w.log() + (1 - w) * (1 - w).log()).mean()
    loss = fit + lam * penalty + cfg["gate_entropy_weight"] * entropy
    return loss, {"fit": fit.item(), "penalty": penalty.item(), "mean_weight": mean_w.item(),
                  "entropy": entropy.item()}


# -----------------------------------------------------------------------------
# One optimizer loop for every tuning job

def fit(params, loss_of, iters, *, learning_rate, min_lr, warmup_iters, beta1, beta2, weight_decay, grad_clip,
        log_interval, accum=1, evaluate=None, eval_interval=0, log_last=False, prefix="iter", start=0, opt=None):
    """AdamW, warmup then cosine (configurator.lr_at): step it backpropagates (loss, log) = loss_of(it) `accum`
    times (loss / accum), clips to grad_clip (0 = off), steps. params: tensors, or AdamW's parameter groups,
    each with an optional "lr_scale" (its rate: the schedule's times that). evaluate(it) before step 0, every
    eval_interval (0 = never) and after the last; every log_interval steps (log_last: and the last) prints
    "<prefix> <step>: <log(lr)>, <ms> ms/iter". start, opt: a resumed run's next step and its optimizer (the one
    new_optimizer made, its state loaded); `start` was evaluated before. -> [evaluate's results]."""
    opt = opt if opt is not None else new_optimizer(list(params), learning_rate, beta1, beta2, weight_decay)
    params = [p for group in opt.param_groups for p in group["params"]]
    evals, t0 = [], time.time()
    for it in range(start, iters + 1):
        due = it in (0, iters) or (eval_interval and it % eval_interval == 0)
        if evaluate is not None and due and not it == start > 0:
            evals.append(evaluate(it))
        if it == iters:
            return evals
        lr = configurator.lr_at(it, learning_rate, min_lr, warmup_iters, iters)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for _ in range(accum):
            loss, log = loss_of(it)
            (loss / accum).backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % log_interval == 0 or (log_last and it + 1 == iters):
            ms, t0 = 1000 * (time.time() - t0) / log_interval, time.time()
            print(f"{prefix} {it + 1}: {log(lr)}, {ms:.0f} ms/iter")


def new_optimizer(params, learning_rate, beta1, beta2, weight_decay, **_):
    """fit's AdamW (fit sets each step's learning rate); **_: the rest of optimizer_settings."""
    return torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)


def optimizer_settings(cfg):
    """fit's optimizer keywords, from cfg."""
    return {k: cfg[k] for k in ("learning_rate", "min_lr", "warmup_iters", "beta1", "beta2", "weight_decay",
                                "grad_clip", "log_interval")}


# -----------------------------------------------------------------------------
# The tuning run, phase by phase

RENAMED = {"exit_head_vocab": "draft_vocab", "exit_head_windows": "draft_windows"}   # old key -> new (one release)


def _int(lo, hint=""):
    """A rule: an int >= lo (bool is not an int here)."""
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an int >= {lo}{hint}"


def _num(ok, what):
    """A rule: a number for which ok(v) holds."""
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v)), what


def _fraction(v):
    return 0 < v <= 1


# Every setting with a range of its own -> (test, what the error says is allowed). check_config adds the rules that
# join two keys. configurator has already checked each value's type against the default's.
VALUE_RULES = {
    "batch_size": _int(1), "block_size": _int(2), "gradient_accumulation_steps": _int(1),
    "max_iters": _int(0, " (0: no training, e.g. to calibrate init_from's file)"),
    "eval_interval": _int(1), "eval_iters": _int(1), "log_interval": _int(1), "calib_windows": _int(1),
    "R": _int(1), "base_layers": _int(1), "tail_layers": _int(0), "router_start": _int(1), "router_group": _int(1),
    "router_mlp_hidden": _int(0, " (0 = a linear gate)"), "stand_in_rank": _int(0),
    "heal_rank": _int(0, " (0 = no healing; 8 is a good start)"),
    "penalty_warmup_iters": _int(0), "warmup_iters": _int(0), "exit_iters": _int(0, " (0 = no exits)"),
    "exit_head_layer": _int(0, " (0 = gates)"), "exit_head_rank": _int(1),
    "drafter_hidden": _int(1, " (512 is a good start)"), "drafter_steps": _int(1), "draft_windows": _int(1),
    "draft_vocab": _int(0, " (0 = all)"), "self_distill": _int(0, " (0 = tune on the dataset itself)"),
    "self_distill_tokens": _int(1), "self_distill_batch": _int(1),
    "target_active_ratio": _num(_fraction, "a fraction in (0, 1]"),
    "keep_ratios": ((lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) and _fraction(x)
                                                                    for x in v)),
                    "a tuple of fractions in (0, 1], e.g. (0.6, 0.8)"),
    "exit_layers": ((lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, int) and x >= 1 for x in v)),
                    "a tuple of layer indices >= 1, e.g. (4, 6, 8), or () for none"),
    "exit_threshold": _num(lambda v: 0 < v < 1, "a probability in (0, 1)"),
    "hard_gate_frac": _num(lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0 = soft gates only)"),
    "learning_rate": _num(lambda v: v > 0, "> 0"), "heal_learning_rate": _num(lambda v: v > 0, "> 0"),
    "min_lr": _num(lambda v: v >= 0, ">= 0"), "weight_decay": _num(lambda v: v >= 0, ">= 0"),
    "beta1": _num(lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": _num(lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": _num(lambda v: v >= 0, ">= 0 (0 = off)"), "penalty_weight": _num(lambda v: v >= 0, ">= 0"),
    "gate_entropy_weight": _num(lambda v: v >= 0, ">= 0"),
    "target_mean_layers": _num(lambda v: v >= 0, ">= 0 (0 = off)"),
    "target_tol": _num(lambda v: 0 < v < 1, "in (0, 1), e.g. 0.005"),
    "self_distill_temperature": _num(lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "router": ((lambda v: v in hf_wrap.ROUTER_KINDS), f"one of {', '.join(hf_wrap.ROUTER_KINDS)}"),
    "router_pattern": ((lambda v: v in ("every", "every_other")), "'every' or 'every_other'"),
    "loss": ((lambda v: v in ("kl", "lm")), "'kl' or 'lm'"),
}


def check_config(cfg):
    """cfg with RENAMED keys under their new names (with a note), if every setting can run; else SystemExit."""
    cfg = dict(cfg)
    for old, new in RENAMED.items():
        value = cfg.pop(old, -1)
        if value != -1:
            print(f"note: {old} is renamed {new} (the old name goes in the next release): {new}={value!r}")
            cfg[new] = value
    cfg = with_init_from(cfg)                                   # a resumed or continued run: its file's values
    if cfg["router"] not in KIND_DEFAULTS:
        raise SystemExit(f"error: router={cfg['router']!r}: must be {VALUE_RULES['router'][1]}.")
    kind = {k: v for k, v in KIND_DEFAULTS[cfg["router"]].items() if cfg[k] == -1}
    if kind:
        print(f"{cfg['router']}'s defaults: {', '.join(f'{k}={v!r}' for k, v in kind.items())}")
        cfg.update(kind)
    if int(os.environ.get("RANK", -1)) != -1:
        raise SystemExit("error: router tuning runs in one process (the routers are tiny): run python tune.py "
                         "..., not torchrun.")
    if cfg["out_dir"] and os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        raise SystemExit(f"error: out_dir={cfg['out_dir']!r} is a file; routers.pt goes into a folder: name a folder "
                         "(made if missing), or leave out_dir out for the model's cache folder.")
    if not cfg["hf"]:
        raise SystemExit("error: hf='' names no model: --hf=smollm2-135m (built in), a folder (save_pretrained or "
                         "sample.py --export_hf output), a .gguf file or a hub name.")
    for key, (ok, what) in VALUE_RULES.items():                   # one key at a time: the value's own range
        if not ok(cfg[key]):
            raise SystemExit(f"error: {key}={cfg[key]!r}: must be {what}.")
    for key, ok, what in [("target_speedup", cfg["target_speedup"] == 0 or cfg["target_speedup"] >= 1,
                           "0 (off) or >= 1 (1.6 = 1.6x fewer layer calls)"),
                          ("min_lr", cfg["min_lr"] <= cfg["learning_rate"], f"<= learning_rate={cfg['learning_rate']}"),
                          ("init_gates", cfg["init_gates"] == "budget" or (cfg["init_gates"] == "influence" and
                           cfg["router"] in ("skip", "ffn") and not cfg["init_from"]), "'budget', or 'influence' "
                           "(skip / ffn only; not with init_from)"),
                          ("stand_in_rank", cfg["stand_in_rank"] == 0 or (cfg["router"] in ("skip", "ffn")
                                                                           and cfg["router_group"] == 1),
                           "0 unless router is skip or ffn with router_group=1"),
                          ("tail_layers", cfg["tail_layers"] == 0 or cfg["router"] in ("expert_choice", "token_choice"),
                           "0 unless router is expert_choice or token_choice"),
                          ("drafter", not (cfg["drafter"] and cfg["exit_head_layer"]), "False with exit_head_layer > 0 "
                           "(pick one draft)")]:
        if not ok:
            raise SystemExit(f"error: {key}={cfg[key]!r}: must be {what}.")
    return cfg


RESUME_MAY_CHANGE = ("device", "dtype", "threads", "out_dir", "log_interval", "eval_interval")


def with_init_from(cfg):
    """init_from's recorded settings, with cfg's changes to the defaults on top (a key set to its default takes the
    file's value). An unfinished file resumes: its run's settings, but for RESUME_MAY_CHANGE; else SystemExit."""
    if not cfg["init_from"]:
        return cfg
    try:
        blob = hf_wrap.read_router_file(cfg["init_from"])
    except ValueError as e:
        raise SystemExit(f"error: init_from: {e}") from None
    if blob["format"] != hf_wrap.ROUTER_FILE_FORMAT:
        raise SystemExit(f"error: init_from={cfg['init_from']} holds {hf_wrap.FILE_HOLDS[blob['format']]}; "
                         "init_from starts router gates only.")
    recorded = {k: v for k, v in blob.get("config", {}).items() if k in cfg and k != "init_from"}
    changed = {k: v for k, v in cfg.items() if v != _DEFAULTS.get(k, v) and k != "init_from"}
    resume = not blob.get("finished", True)
    clash = {k: v for k, v in changed.items() if k in recorded and v != recorded[k] and k not in RESUME_MAY_CHANGE}
    if resume and clash:
        raise SystemExit(f"error: init_from={cfg['init_from']} is an unfinished run: it resumes with its own settings"
                         f", and {', '.join(f'{k}={v!r} (its {recorded[k]!r})' for k, v in clash.items())} would "
                         "change them. Drop those, or start a new run without init_from.")
    print(f"init_from={cfg['init_from']}: " + (f"resuming its run after iteration {blob.get('iter_num')} of "
          f"{blob.get('max_iters')}" if resume else "its gates") + ", with its settings" + (
          f" and {', '.join(f'{k}={v!r}' for k, v in changed.items())}" if changed else ""))
    return {**cfg, **recorded, **changed}


def load_base(cfg):
    """The frozen base (a Llama-family decoder, bf16 on CUDA, else float32) -> (model, tokenizer, device)."""
    name, device = cfg["hf"], configurator.autodetect_device(cfg["device"])
    _, dtype = configurator.autocast_context(device.split(":")[0], cfg["dtype"])
    model, tok = load_hf(name, device=device, dtype=dtype)
    mc = model.config
    if mc.model_type not in hf_wrap.SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"error: {name} is a {mc.model_type!r} model; DepthAdapter supports Llama-family "
                         f"decoders: {', '.join(hf_wrap.SUPPORTED_MODEL_TYPES)}.")
    if tok is None:
        raise SystemExit(f"error: {name} has no tokenizer: tuning encodes its text with the model's own.")
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and cfg["block_size"] > max_pos:
        raise SystemExit(f"error: block_size={cfg['block_size']} exceeds {name}'s context ({max_pos}): lower "
                         "block_size.")
    return model.requires_grad_(False), tok, device


def make_routers(cfg, model):
    """hf_wrap.FrozenRouters of cfg's kind, every weight at target_active_ratio (expert-choice: its product over
    the units; token-choice starts at full depth), so the penalty has nothing to undo; or init_from's gates. Its
    healing (heal_rank > 0) corrects every layer from the first routed one on: the layers whose input routing
    changes, the always-run last ones included (they make the prediction). -> (routers, init_from's dict or None)."""
    mc = model.config
    kind, L = cfg["router"], mc.num_hidden_layers
    try:
        if kind in ("expert_choice", "token_choice"):
            units = hf_wrap.group_layout(L, cfg["R"], cfg["base_layers"], cfg["tail_layers"])
        else:
            units = hf_wrap.unit_layout(L, cfg["router_pattern"], cfg["router_start"], cfg["router_stop"],
                                        cfg["router_group"])
        p = cfg["target_active_ratio"] ** (2 / (len(units) + 1) if kind == "expert_choice" else 1)
        init = hf_wrap.GATE_INIT_LOGIT if kind == "token_choice" or p >= 0.99 else math.log(p / (1 - p))
        routers = hf_wrap.FrozenRouters(kind, mc.hidden_size, units, cfg["exit_layers"], cfg["router_mlp_hidden"],
                                        init, cfg["stand_in_rank"], cfg["heal_rank"], range(units[0][0], L),
                                        hf_wrap.heal_shapes(model.model.layers[0]), cfg["tail_layers"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not cfg["init_from"]:
        return routers, None
    try:
        start, blob = hf_wrap.load_routers(cfg["init_from"], mc, unfinished_ok=True)
    except ValueError as e:
        raise SystemExit(f"error: init_from: {e}") from None
    if (start.kind, start.units, start.stand_in_rank) != (kind, routers.units, routers.stand_in_rank):
        raise SystemExit(f"error: init_from={cfg['init_from']} holds {start.kind} routers over units {start.units}"
                         f" with stand_in_rank={start.stand_in_rank}; this run trains {kind} over {routers.units} "
                         f"with stand_in_rank={routers.stand_in_rank}.")
    routers.gates.load_state_dict(start.gates.state_dict())
    if routers.stand_ins is not None:
        routers.stand_ins.load_state_dict(start.stand_ins.state_dict())
    if start.heals is not None and routers.heals is not None:             # healing too, when both have it alike
        if (start.heal_rank, start.heal_layers) != (routers.heal_rank, routers.heal_layers):
            raise SystemExit(f"error: init_from={cfg['init_from']} heals layers {start.heal_layers} at rank "
                             f"{start.heal_rank}; this run heals {routers.heal_layers} at heal_rank="
                             f"{routers.heal_rank} (heal_rank=0 starts from its gates alone).")
        routers.heals.load_state_dict(start.heals.state_dict())
    return routers, blob


def tuning_text(cfg, model, tok, folder):
    """(train ids, val ids): the model's own answers (self_distill_ids; made once, then read from folder, where the
    routers go), or the dataset in its tokens."""
    if cfg["self_distill"]:
        train_ids, val_ids = cached_answers(cfg, model, tok, folder)
    else:
        train_ids, val_ids = corpus_ids(tok, cfg["dataset"])
    if max(int(train_ids.max()), int(val_ids.max())) >= model.config.vocab_size:
        raise SystemExit(f"error: the tokenizer gives ids beyond the model's vocab_size={model.config.vocab_size}.")
    if cfg["self_distill"] and cfg["out_dir"]:             # the answers as text, for another run's --dataset
        with open(os.path.join(cfg["out_dir"], "self_distill.txt"), "w", encoding="utf-8") as f:
            f.write(tok.decode(train_ids.tolist() + val_ids.tolist()))
    return train_ids, val_ids


def cached_answers(cfg, model, tok, folder):
    """self_distill_ids, kept in folder/self_distill-<its settings>.npz (the same ids on every later run: a resumed
    one tunes on the text it started on); remade when the file holds another model's."""
    n, tokens, temp, seed = (cfg[k] for k in ("self_distill", "self_distill_tokens", "self_distill_temperature",
                                              "seed"))
    words = cfg["dataset"] if cfg["dataset"] in data.DATASETS else re.sub(r"\W", "_", os.path.basename(cfg["dataset"]))
    path = os.path.join(folder, f"self_distill-{words}-{n}x{tokens}-t{temp:g}-seed{seed}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            if str(f["model"]) == cfg["hf"]:
                print(f"tuning text: the model's {n} answers, from {path}")
                return f["train"], f["val"]
    print(f"tuning text: the model's own answers to {n} chat prompts made of {cfg['dataset']}'s words, {tokens} new "
          f"tokens each (self_distill; once, then kept in {path}; self_distill=0 tunes on {cfg['dataset']} itself)")
    train_ids, val_ids = self_distill_ids(model, tok, cfg["dataset"], n, tokens, seed, cfg["self_distill_batch"], temp)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"                       # atomic, as configurator.save_checkpoint
    with open(tmp, "wb") as f:
        np.savez(f, train=train_ids, val=val_ids, model=cfg["hf"])
    os.replace(tmp, path)
    return train_ids, val_ids


def start_at_static_drop(routers, influence, target_active_ratio, mlp_hidden):
    """init_gates='influence' (ShortGPT's static drop as the start; training then lets each token choose): only
    the gates' biases move."""
    units = routers.units
    unit_bi = [sum(influence[a:b]) / (b - a) for a, b in units]
    off = set(sorted(range(len(units)), key=lambda u: unit_bi[u])[:round((1 - target_active_ratio) * len(units))])
    for u, g in enumerate(routers.gates):
        (g.net[-1] if mlp_hidden else g.net).bias.data.fill_(
            -hf_wrap.GATE_INIT_LOGIT if u in off else hf_wrap.GATE_INIT_LOGIT)
    print(f"gates start at the static drop of units {sorted(units[u] for u in off)} (lowest block influence)")


def _batches(windows, size, device):
    """(inputs, targets) of windows (N, T + 1), size at a time."""
    for i in range(0, len(windows), size):
        w = windows[i:i + size].to(device)
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate_gates(model, routers, decided, val, batch_size, full_val, it):
    """Phase 1's evaluation: val loss with soft weights, and the adapter's (decided(), bias 0) perplexity."""
    routers.eval()
    dev = model.get_input_embeddings().weight.device
    soft = [F.cross_entropy(soft_forward(model, routers, X)[0].flatten(0, 1).float(), Y.flatten(),
                            reduction="sum").item() / Y.numel() * len(X) for X, Y in _batches(val, batch_size, dev)]
    hard = eval_ppl(decided(), val, batch_size)
    routers.train()
    print(f"step {it}: val loss full depth {full_val:.4f}, soft weights {sum(soft) / len(val):.4f} | decided "
          f"(bias 0): val ppl {hard['ppl']:.3f} (full {math.exp(full_val):.3f}) at layer-call ratio "
          f"{hard['layer_ratio']:.3f}")
    return {"iter": it, "val_loss_soft": sum(soft) / len(val), "val_ppl_bias0": hard["ppl"],
            "layer_ratio_bias0": hard["layer_ratio"]}


def train_gates(model, routers, cfg, train_ids, gen, checkpoint, calib, start=0, opt_state=None):
    """Phase 1: the gates (and stand-ins), from step `start` (a resumed run: with its optimizer state);
    checkpoint(it, optimizer) at fit's evaluations. -> (the share of calib's tokens that run each unit at bias 0,
    their mean over the routed layers: the mean hard weight the budget aims at)."""
    dev = model.get_input_embeddings().weight.device
    sizes = torch.tensor([float(b - a) for a, b in routers.units], device=dev)   # layers under each unit
    B, block, iters = cfg["batch_size"], cfg["block_size"], cfg["max_iters"]

    def step(it):
        hard = it >= (1 - cfg["hard_gate_frac"]) * iters                      # the last part: straight-through
        X, Y = data.get_batch(train_ids, B, block, gen, dev)
        full_logits = None
        if cfg["loss"] == "kl":
            with torch.no_grad():
                full_logits = soft_forward(model, None, X)[0]                 # the full model: what to keep
        logits, weights, _ = soft_forward(model, routers, X, hard=hard)
        loss, parts = _tuning_loss(logits, Y, weights, cfg, it, sizes, full_logits)
        return loss, lambda lr: (f"loss {loss.item():.4f} ({cfg['loss']} {parts['fit']:.4f}, penalty "
                                 f"{parts['penalty']:.4f}, entropy {parts['entropy']:.3f}), mean "
                                 f"{'hard' if hard else 'soft'} weight {parts['mean_weight']:.3f} (target "
                                 f"{cfg['target_active_ratio']}), lr {lr:.2e}")

    trained = [p for m in (routers.gates, routers.stand_ins) if m is not None for p in m.parameters()]
    if routers.heals is not None:                          # healing at its own rate (a LoRA moves the layers)
        trained = [{"params": trained}, {"params": list(routers.heals.parameters()),
                                         "lr_scale": cfg["heal_learning_rate"] / cfg["learning_rate"]}]
    settings = optimizer_settings(cfg)
    opt = new_optimizer(trained, **settings)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    routers.train()
    fit(trained, step, iters, accum=cfg["gradient_accumulation_steps"], evaluate=lambda it: checkpoint(it, opt),
        eval_interval=cfg["eval_interval"], start=start, opt=opt, **settings)
    routers.eval().requires_grad_(False)
    with torch.no_grad():                                                     # inference's 0/1 decisions
        w = torch.cat([soft_forward(model, routers, X, hard=True)[1].flatten(0, 1) for X, _ in _batches(calib, B, dev)])
    print("share of calibration tokens that run each unit at bias 0: "
          + ", ".join(f"{a}-{b - 1}: {g:.2f}" for (a, b), g in zip(routers.units, w.mean(0).tolist())))
    return w.mean(0).tolist(), float((w * sizes).sum(-1).mean() / sizes.sum())


def learned_nothing(mean_hard, cfg):
    """A warning when tuning ended with the routers at full depth, or far from the budget ("" when not)."""
    target = cfg["target_active_ratio"]
    if mean_hard >= 0.99 and target < 0.99:
        what = "every token runs every routed layer: the routers learned nothing"
    elif abs(mean_hard - target) > 0.15:
        what = f"far {'above' if mean_hard > target else 'below'} the target"
    else:
        return ""
    fix = (f"more steps (--max_iters={2 * max(cfg['max_iters'], 20)}) or a stronger penalty (--penalty_weight="
           f"{2 * max(cfg['penalty_weight'], 1):g})" if mean_hard > target else
           f"soft gates only (--hard_gate_frac=0: straight-through can shut every gate, as expert_choice's on "
           f"SmolLM2-135M) or a weaker penalty (--penalty_weight={cfg['penalty_weight'] / 2:g})")
    return (f"warning: mean hard weight {mean_hard:.3f} at bias 0 (target {target}): {what}. Try {fix}; keep_ratio's "
            "cutoffs still route by the gates' ranking.")


def train_exits(model, routers, cfg, train_ids, gen):
    """Phase 2, routers frozen: each exit gate learns by BCE whether its layer's state, through the final norm
    and LM head, already gives the routed model's argmax (CALM's consistency target)."""
    dev, head, norm = model.get_input_embeddings().weight.device, model.get_output_embeddings(), model.model.norm
    exit_layers = routers.exit_layers

    def step(it):
        X, _ = data.get_batch(train_ids, cfg["batch_size"], cfg["block_size"], gen, dev)
        with torch.no_grad():                                                 # the model and routers: fixed
            logits, _, states = soft_forward(model, routers, X)
            final = logits.argmax(-1)                                         # (B, T) what continuing gives
            target = {l: (head(norm(h)).argmax(-1) == final).float() for l, h in states.items()}
        loss = sum(F.binary_cross_entropy_with_logits(routers.exits[i](states[l])[..., 0], target[l])
                   for l, i in routers.exit_at.items()) / len(exit_layers)
        agree = lambda: ", ".join(f"layer {l}: {target[l].mean().item():.2f}" for l in exit_layers)
        return loss, lambda lr: f"BCE {loss.item():.4f}, intermediate argmax already final: {agree()}"

    routers.exits.requires_grad_(True)
    fit(routers.exits.parameters(), step, cfg["exit_iters"], log_last=True, prefix="exit iter",
        **{**optimizer_settings(cfg), "grad_clip": 0.0})
    routers.eval().requires_grad_(False)


def calibrate_cutoffs(decided, keep_ratios, calib):
    """Each keep_ratio's per-unit cutoffs (DepthAdapter.calibrate) -> {"0.50": [cutoff per unit], ...}."""
    cutoffs = {}
    for kr in keep_ratios:
        adapter = decided(keep_ratio=kr)
        cutoffs[f"{kr:.2f}"] = adapter.calibrate(calib[:, :-1].to(adapter.embed.weight.device)).tolist()
    print(f"calibrated cutoffs for keep_ratio {', '.join(cutoffs)}")
    return cutoffs


def search_bias(decided, calib, val, batch_size, target, tol, full_val):
    """search_cutoff on decided(bias=...) over calib. -> (bias, the search's numbers and held-out's)."""
    measure = lambda v: eval_ppl(decided(bias=v), calib, batch_size)
    bias, found, reached = search_cutoff(measure, -30.0, 30.0, target, tol)
    held, full_ppl = eval_ppl(decided(bias=bias), val, batch_size), math.exp(full_val)
    print(f"target layer-call ratio {target:.3f} (speedup {1 / target:.2f}x in layer calls): bias "
          f"{bias:.4g} gives {found['layer_ratio']:.3f} on calibration text"
          f"{'' if reached else ' (the closest reachable: not within target_tol)'}; held-out text: ratio "
          f"{held['layer_ratio']:.3f}, ppl {held['ppl']:.3f} vs full depth {full_ppl:.3f} "
          f"({100 * (held['ppl'] / full_ppl - 1):+.1f}%)")
    return bias, {"layer_ratio": target, "calib_ratio": found["layer_ratio"], "reached": reached,
                  "val_ratio": held["layer_ratio"], "val_ppl": held["ppl"]}


def print_plan(cfg, model, routers, n_train, n_val):
    """What this run tunes, and the layer-call ratio its budget stands for."""
    mc, units, kind = model.config, routers.units, routers.kind
    L, routed = mc.num_hidden_layers, sum(b - a for a, b in units)
    print(f"router tuning for {cfg['hf']} ({mc.model_type}, {L} layers, base frozen): {kind} routers, {len(units)} "
          f"units over {routed} routed layers (units {units}), exit gates at {routers.exit_layers or 'none'}; "
          f"{sum(p.numel() for p in routers.parameters()):,} trainable parameters; "
          f"{n_train:,} train / {n_val:,} val tokens")
    # every unit at target_active_ratio would run this fraction of all layer calls (ffn: of the MLPs)
    print(f"target_active_ratio {cfg['target_active_ratio']} of routed units ~ a {'MLP' if kind == 'ffn' else 'layer'}"
          f"-call ratio of {(L - routed + cfg['target_active_ratio'] * routed) / L:.3f}")


def tune_draft(cfg, model, tok, train_ids, val, path):
    """A speculative draft (below) instead of gates. -> its last held-out evaluation."""
    # the state hf_wrap.unready reads, as a routers file records it; a draft is saved once, at the end
    state = dict(finished=True, iter_num=cfg["max_iters"], max_iters=cfg["max_iters"], trained=cfg["max_iters"] > 0)
    common = dict(vocab_size=cfg["draft_vocab"], windows=cfg["draft_windows"], block_size=cfg["block_size"],
                  batch_size=cfg["batch_size"], seed=cfg["seed"], iters=cfg["max_iters"],
                  meta=dict(model=cfg["hf"], config=cfg, **state), **optimizer_settings(cfg))
    if cfg["exit_head_layer"]:
        return tune_exit_head(model, train_ids, val, path, layer=cfg["exit_head_layer"], rank=cfg["exit_head_rank"],
                              **common)
    extra = corpus_ids(tok, cfg["drafter_text"])[0] if cfg["drafter_text"] else None
    return tune_drafter(model, train_ids, val, path, hidden=cfg["drafter_hidden"], steps=cfg["drafter_steps"],
                        extra_ids=extra, **common)


def router_file(cfg):
    """Where this run writes: out_dir/routers.pt, or routers-<kind>.pt in the model's cache folder."""
    if cfg["out_dir"]:
        return os.path.join(cfg["out_dir"], "routers.pt")
    kind = "exit_head" if cfg["exit_head_layer"] else "drafter" if cfg["drafter"] else cfg["router"]
    return data.default_routers(cfg["hf"], kind)


def resume_point(cfg, start, run):
    """Where phase 1 starts: step 0 with batches from the seed, or, for init_from's unfinished run, its next step,
    batch generator and optimizer state (and its last evaluation into run). -> (generator, step, state or None)."""
    gen = torch.Generator().manual_seed(cfg["seed"])                          # the training batches, both phases
    if start is None or start.get("finished", True):
        return gen, 0, None
    gen.set_state(start["resume"]["batch_rng"])
    run["last_eval"] = start.get("last_eval")
    return gen, start["iter_num"], start["resume"]["optimizer"]


def tune_routers(cfg):
    """The whole run (cfg: default_config(...) or the script's), phase by phase; its file (router_file) is saved
    at every evaluation, marked unfinished, and at the end."""
    t0, cfg = time.time(), check_config(cfg)
    configurator.set_threads(cfg["threads"])
    path = router_file(cfg)
    print(f"writing {path}" + (" (it replaces the file there)" if os.path.exists(path) else ""))
    torch.manual_seed(cfg["seed"])                                            # the gates' first weights
    model, tok, device = load_base(cfg)
    routers, start = make_routers(cfg, model)
    routers = routers.to(device)
    train_ids, val_ids = tuning_text(cfg, model, tok, os.path.dirname(path))
    B, block = cfg["batch_size"], cfg["block_size"]
    calib = text_windows(train_ids, block, cfg["calib_windows"], torch.Generator().manual_seed(cfg["seed"] + 2))
    val = text_windows(val_ids, block, cfg["eval_iters"] * B)                 # held out: never tuned on
    if cfg["exit_head_layer"] or cfg["drafter"]:
        last = tune_draft(cfg, model, tok, train_ids, val, path)
        print(f"done in {(time.time() - t0) / 60:.1f} min: held-out KL {last['kl']:.4f}, the draft's argmax is the "
              f"full model's {last['greedy_agree']:.1%}; wrote {path}")
        return
    if cfg["init_gates"] == "influence":
        start_at_static_drop(routers, block_influence(model, calib, B), cfg["target_active_ratio"],
                             cfg["router_mlp_hidden"])
    print_plan(cfg, model, routers, len(train_ids), len(val_ids))
    full_val = eval_ppl(DepthAdapter(model), val, B)["nll"]                   # per token, like every number here
    decided = functools.partial(DepthAdapter, model, router=routers.kind, routers=routers, bias=0.0, exits=False,
                                exit_threshold=cfg["exit_threshold"])
    # the file's contents besides the weights: unfinished until the end (hf_wrap.unready refuses it till then)
    run = {"model": cfg["hf"], "config": cfg, "bias": 0.0, "exit_threshold": cfg["exit_threshold"],
           "exits_trained": False, "full_val_loss": full_val, "max_iters": cfg["max_iters"], "finished": False,
           "calibrated": False, "trained": cfg["max_iters"] > 0 or bool(cfg["init_from"])
           or cfg["init_gates"] == "influence"}
    gen, first_step, opt_state = resume_point(cfg, start, run)

    def save(**extra):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        hf_wrap.save_routers(path, routers, model.config, **{**run, **extra})

    def checkpoint(it, opt):                          # a killed run resumes from the last of these
        run["last_eval"] = evaluate_gates(model, routers, decided, val, B, full_val, it)
        if it > 0:
            save(iter_num=it, resume={"optimizer": opt.state_dict(), "batch_rng": gen.get_state()})

    run["unit_hard_weight"], mean_hard = train_gates(model, routers, cfg, train_ids, gen, checkpoint, calib,
                                                     first_step, opt_state)
    if routers.exit_layers and cfg["exit_iters"] > 0:
        train_exits(model, routers, cfg, train_ids, gen)
        run["exits_trained"] = True
    final = functools.partial(decided, exits=run["exits_trained"])            # with the exit gates, if trained
    bias = calibrate(final, cfg, run, start, calib, val, full_val, model.config.num_hidden_layers)
    save(iter_num=cfg["max_iters"], bias=bias, finished=True, calibrated=True)
    held = eval_ppl(final(bias=bias), val, B)
    warning = learned_nothing(mean_hard, cfg) if run["trained"] else (
        "note: max_iters=0, no init_from: untrained gates, which sample.py refuses (--random_routers runs them, for "
        "speed measurements only)")
    if warning:
        print(warning)
    where = f"--routers {path}" if cfg["out_dir"] else f"--hf {cfg['hf']} --router {routers.kind}"
    if run["trained"]:
        print(f"  python sample.py {where}{' --keep_ratio 0.6' if '0.60' in run.get('cutoffs', {}) else ''} --prompt "
              "'Explain mixture of recursions simply.' --return_depth_trace")
    print(f"done in {(time.time() - t0) / 60:.1f} min: held-out ppl {held['ppl']:.3f} (full depth "
          f"{math.exp(full_val):.3f}) at bias {bias:.3g}, {held['layer_ratio']:.1%} of layer calls "
          f"({1 - held['layer_ratio']:.1%} saved); wrote {path}")


def calibrate(final, cfg, run, start, calib, val, full_val, L):
    """The last phase: each keep_ratio's cutoffs (cfg's and init_from's; token-choice has none) into run, and the
    bias of the compute target, if any. -> the bias (0: the decisions training ended on)."""
    if cfg["router"] != "token_choice":
        ratios = sorted(set(cfg["keep_ratios"]) | {float(k) for k in (start or {}).get("cutoffs", {})})
        run["cutoffs"] = calibrate_cutoffs(final, ratios, calib)
    target = (1 / cfg["target_speedup"] if cfg["target_speedup"] else
              cfg["target_mean_layers"] / L if cfg["target_mean_layers"] else None)
    if target is None:
        return 0.0
    bias, run["target"] = search_bias(final, calib, val, cfg["batch_size"], target, cfg["target_tol"], full_val)
    return bias


# -----------------------------------------------------------------------------
# A speculative draft (speculative.py decodes with it): an exit head or a drafter, trained by KL to the full
# model's distribution renormalized over the draft's vocab (it cannot propose what it lacks), on frozen-base
# states computed once over draft_windows windows; its steps then never run the base

@torch.no_grad()
def _states(model, layer, windows, batch_size):
    """The frozen base over windows (N, T): (the states entering `layer`, the final normed states), each
    (N * T, C)."""
    h, final = [], []
    for i in range(0, len(windows), batch_size):
        out = model.model(windows[i:i + batch_size], output_hidden_states=True)
        h.append(out.hidden_states[layer].flatten(0, 1))                   # hidden_states[l]: layer l's input
        final.append(out.last_hidden_state.flatten(0, 1))                  # after the final norm
    return torch.cat(h), torch.cat(final)


def _head_vocab(train_ids, V, size):
    """-> (the `size` most frequent tokens of the tuning text, or None for 0: all; its token counts (V,))."""
    counts = torch.bincount(torch.from_numpy(train_ids.astype("int64")), minlength=V)
    if not size:
        return None, counts
    return counts.argsort(descending=True)[:min(size, int((counts > 0).sum()))], counts


def _draft_windows(ids, block_size, windows, dev):
    """Up to `windows` windows of ids, back to back: (n, block_size) inputs on dev."""
    return text_windows(ids, block_size, min(windows, len(ids) // (block_size + 1)))[:, :-1].to(dev)


def _fit_draft(model, module, loss_of, n, evaluate, save, path, *, block_size, batch_size, seed, meta, **schedule):
    """fit on a draft: each step, loss_of(idx) of batch_size * block_size random indices into range(n); then
    frozen, saved (hf_wrap.save_exit_head or speculative.save_drafter) with its first and last evaluations.
    -> the last."""
    gen = torch.Generator().manual_seed(seed)

    def step(it):
        loss = loss_of(torch.randint(n, (batch_size * block_size,), generator=gen))
        return loss, lambda lr: f"KL {loss.item():.4f}"

    evals = fit(module.parameters(), step, evaluate=evaluate, **schedule)
    module.eval().requires_grad_(False)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save(path, module, model, **meta, untrained=evals[0], last_eval=evals[-1])
    print(f"  python sample.py --routers {path} --speculative=4")
    return evals[-1]


def tune_exit_head(model, train_ids, val, path, *, layer, rank, vocab_size, windows, **job):
    """hf_wrap.ExitHead at `layer` (adapter rank `rank`). Reports, on held-out text, how often its argmax is the
    full model's (greedy acceptance) and sum(min(p, q)) (acceptance sampling at temperature 1). job: _fit_draft's."""
    dev = model.get_input_embeddings().weight.device
    L, V = model.config.num_hidden_layers, model.config.vocab_size
    vocab, counts = _head_vocab(train_ids, V, vocab_size)
    try:
        head = hf_wrap.new_exit_head(model, layer, vocab, rank)
    except ValueError as e:
        raise SystemExit(f"error: exit_head_layer: {e}") from None
    W = model.get_output_embeddings().weight
    Wv = W if vocab is None else W[head.vocab].float()                       # (V', C) the head's rows, frozen
    t0 = time.time()
    h, final = _states(model, layer, _draft_windows(train_ids, job["block_size"], windows, dev), job["batch_size"])
    vh, vfinal = _states(model, layer, val[:, :-1].to(dev), job["batch_size"])
    print(f"exit head at layer {layer} of {L} (rank {rank}, vocab {len(head.vocab):,} of {V:,}: "
          f"{counts[head.vocab].sum() / counts.sum():.1%} of the tuning text's tokens); {len(h):,} train / "
          f"{len(vh):,} held-out tokens, base states in {time.time() - t0:.0f} s")
    kl = lambda hs, fs: _kl(F.linear(fs.to(Wv.dtype), Wv), head(hs, Wv))   # p renormalized over the vocab

    @torch.no_grad()
    def evaluate(it):
        agree = overlap = loss = 0.0
        for i in range(0, len(vh), 512):
            hs, fs = vh[i:i + 512], vfinal[i:i + 512]
            k, logq = kl(hs, fs)
            target = F.linear(fs, W).argmax(-1)                               # the full model's greedy token
            agree += float((head.vocab[logq.argmax(-1)] == target).sum())
            p = F.softmax(F.linear(fs.to(Wv.dtype), Wv).float(), -1)
            overlap += float(torch.minimum(p, logq.exp()).sum(-1).sum())
            loss += float(k.sum())
        result = {"iter": it, "kl": loss / len(vh), "greedy_agree": agree / len(vh), "overlap": overlap / len(vh)}
        print(f"step {it}: held-out KL {result['kl']:.4f}, argmax = the full model's {result['greedy_agree']:.1%}, "
              f"sum min(p, q) {result['overlap']:.1%}")
        return result

    loss_of = lambda idx: kl(h[idx.to(dev)], final[idx.to(dev)])[0].mean()
    return _fit_draft(model, head, loss_of, len(h), evaluate, hf_wrap.save_exit_head, path, **job)


@torch.no_grad()
def _final_states(model, windows, batch_size):
    """The full model's final states before the final norm (N, T, C), through the adapter's full-depth loop
    (Pass.final_h): what a drafter reads when it drafts."""
    full, out = DepthAdapter(model, no_skip=True), []
    for i in range(0, len(windows), batch_size):
        cache, ids, pos, _ = full.new_cache(windows[i:i + batch_size])
        out.append(full.forward_chunk(cache, ids, pos, 0).final_h)
    return torch.cat(out)


def tune_drafter(model, train_ids, val, path, *, hidden, steps, vocab_size, windows, extra_ids=None, **job):
    """speculative.Drafter (MLP width `hidden`) on the full model's final state, trained to draft `steps` tokens
    in a row: from h_t and the text's x_{t+1}, its step j (from its own state of step j - 1 and x_{t+j}) matches
    the full model's distribution at t + j. Reports, on held-out text, how often the first 1, 2, ... drafts in a
    row are all the full model's argmax (greedy acceptance of a cycle's leading drafts). extra_ids: more text,
    up to `windows` more windows (held-out text stays the tuning text's). job: _fit_draft's."""
    block_size, batch_size = job["block_size"], job["batch_size"]
    dev, V, D = model.get_input_embeddings().weight.device, model.config.vocab_size, steps
    vocab, counts = _head_vocab(train_ids, V, vocab_size)
    drafter = speculative.new_drafter(model, vocab, hidden)
    W, E, norm = model.get_output_embeddings().weight, model.get_input_embeddings().weight, model.model.norm
    Wv = W if vocab is None else W[drafter.vocab].float()                   # (V', C) its LM-head rows, frozen
    wins, vwin = _draft_windows(train_ids, block_size, windows, dev), val[:, :-1].to(dev)
    if extra_ids is not None:                 # the vocab stays the tuning text's
        wins = torch.cat([wins, _draft_windows(extra_ids, block_size, windows, dev)])
    T = wins.shape[1] - D                                                     # start positions per window
    if T < 1:
        raise SystemExit(f"error: block_size={block_size} leaves no room to draft drafter_steps={D} tokens "
                         "ahead: use a block_size above drafter_steps.")
    t0 = time.time()
    h, vh = _final_states(model, wins, batch_size), _final_states(model, vwin, batch_size)
    print(f"drafter (hidden {hidden}, {D} steps, vocab {len(drafter.vocab):,} of {V:,}: "
          f"{counts[drafter.vocab].sum() / counts.sum():.1%} of the tuning text's tokens; "
          f"{sum(p.numel() for p in drafter.parameters()):,} trainable parameters); {h.shape[0] * T:,} train / "
          f"{vh.shape[0] * T:,} held-out start positions, base states in {time.time() - t0:.0f} s")

    def chain(hs, ids, idx):
        """Drafts 1..D from the start positions idx (flat over (window, t)) -> per step (KL (N,), logq, fs)."""
        b, t, out = idx // T, idx % T, []
        s = hs[b, t]
        for j in range(1, D + 1):
            s = drafter.step(s, E[ids[b, t + j]])             # the text's token (the verified one, decoding)
            fs = norm(hs[b, t + j])
            k, logq = _kl(F.linear(fs.to(Wv.dtype), Wv), drafter(s, Wv))
            out.append((k, logq, fs))
        return out

    @torch.no_grad()
    def evaluate(it):
        N = vh.shape[0] * T
        agree, loss = torch.zeros(D), 0.0
        for i in range(0, N, 512):
            ok = True
            for j, (k, logq, fs) in enumerate(chain(vh, vwin, torch.arange(i, min(i + 512, N), device=dev))):
                ok = ok & (drafter.vocab[logq.argmax(-1)] == F.linear(fs, W).argmax(-1))   # all drafts so far
                agree[j] += float(ok.sum())
                loss += float(k.sum()) / D
        chained = (agree / N).tolist()
        result = {"iter": it, "kl": loss / N, "greedy_agree": chained[0], "chain_agree": chained,
                  "tokens_per_cycle": 1 + sum(chained)}
        print(f"step {it}: held-out KL {result['kl']:.4f}, the first 1..{D} drafts all the full model's argmax: "
              + " / ".join(f"{a:.1%}" for a in chained) + f" (at K={D}: {1 + sum(chained):.2f} tokens per cycle)")
        return result

    loss_of = lambda idx: sum(k.mean() for k, _, _ in chain(h, wins, idx.to(dev))) / D
    return _fit_draft(model, drafter, loss_of, h.shape[0] * T, evaluate, speculative.save_drafter, path, **job)


# -----------------------------------------------------------------------------
# Measured through the adapter (bench.py --mode=ppl uses these too)

@torch.no_grad()
def eval_ppl(adapter, windows, batch_size=8, keep_argmax=False, reference=None):
    """Teacher-forced perplexity of `windows` (N, T + 1) through adapter.prefill_logits, and the work over
    tokens * L: layer_ratio (layer calls), kv_ratio (K/V-only work), head_ratio (the exits' LM-head calls).
    keep_argmax: also each batch's greedy tokens; reference (such a list): agree = the share that match it."""
    dev = adapter.embed.weight.device
    nll = calls = kv = head = n = same = 0
    argmax = []
    for j, (X, Y) in enumerate(_batches(windows, batch_size, dev)):
        logits, st = adapter.prefill_logits(X)
        nll += F.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum").item()
        calls, n = calls + st["layer_calls"], n + st["tokens"]
        kv, head = kv + st["kv_only_layer_calls"] * st["kv_share"], head + st["head_checks"] * st["head_share"]
        if keep_argmax or reference is not None:
            argmax.append(logits.argmax(-1).cpu())
            if reference is not None:
                same += int((argmax[-1] == reference[j]).sum())
    L = len(adapter.layers)
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "layer_ratio": calls / (n * L),
           "mean_layers": calls / n, "kv_ratio": kv / (n * L), "head_ratio": head / (n * L), "agree": same / n}
    if keep_argmax:
        out["argmax"] = argmax
    return out


@torch.no_grad()
def block_influence(model, windows, batch_size=8):
    """ShortGPT's block influence, BI_l = 1 - mean over tokens of cos(layer input, layer output), on the full
    model. Low BI: the layer barely turns the residual stream. -> list of L floats."""
    dev = model.get_input_embeddings().weight.device
    total, n = None, 0
    for X, _ in _batches(windows, batch_size, dev):
        bi = []
        soft_forward(model, None, X, influence=bi)
        total = bi if total is None else [a + b for a, b in zip(total, bi)]
        n += X.numel()
    return [t / n for t in total]


def search_cutoff(measure, lo, hi, target, tol=0.005, iters=40):
    """Bisection on a threshold v until measure(v)['layer_ratio'] (monotone in v, either way) is within tol of
    `target`. -> (v, measure(v), reached): out of reach, the closer end and reached=False; a ratio that jumps
    over the target, the closest value seen. measure: e.g. lambda v: eval_ppl(make(v), calib), or exit_ratio."""
    r_lo, r_hi = measure(lo), measure(hi)
    best = min(((abs(r["layer_ratio"] - target), v, r) for v, r in ((lo, r_lo), (hi, r_hi))), key=lambda t: t[0])
    if (r_lo["layer_ratio"] - target) * (r_hi["layer_ratio"] - target) > 0:
        return best[1], best[2], best[0] <= tol
    side_lo = r_lo["layer_ratio"] > target
    for _ in range(iters):
        if best[0] <= tol:
            break
        mid = (lo + hi) / 2
        r = measure(mid)
        best = min(best, (abs(r["layer_ratio"] - target), mid, r), key=lambda t: t[0])
        if (r["layer_ratio"] > target) == side_lo:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[0] <= tol


# -----------------------------------------------------------------------------
# The model's own answers as tuning text (--self_distill)

SELF_PROMPTS = ("Explain {} simply.", "Write a short paragraph about {}.", "What do you know about {}?",
                "Give three facts about {}.", "Tell me a short story about {}.", "Why does {} matter?")


def self_distill_ids(model, tokenizer, dataset, n, new_tokens, seed, batch_size, temperature=0.7):
    """n chat prompts (a SELF_PROMPTS template around a word of the dataset's training text), answered at
    full depth at `temperature` (top-k 50; 0: greedy) -> (train ids, val ids) as corpus_ids gives: prompt,
    answer, eos, back to back; the first tenth of the answers held out."""
    words = sorted(set(re.findall(r"[a-z]{5,}", train_val_text(dataset)[0].lower())))
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: int(torch.randint(k, (1,), generator=g))
    prompts = [SELF_PROMPTS[pick(len(SELF_PROMPTS))].format(words[pick(len(words))]) for _ in range(n)]
    full, eos = DepthAdapter(model, no_skip=True), tokenizer.eos_token_id
    dev, texts, t0 = model.get_input_embeddings().weight.device, [], time.time()
    torch.manual_seed(seed)
    for i in range(0, n, batch_size):
        chat = getattr(tokenizer, "chat_template", None)
        enc = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] if chat else tokenizer(p)["input_ids"]
               for p in prompts[i:i + batch_size]]
        T = max(map(len, enc))
        ids, mask = torch.zeros(len(enc), T, dtype=torch.long), torch.zeros(len(enc), T, dtype=torch.long)
        for row, e in enumerate(enc):                                         # left padding
            ids[row, T - len(e):], mask[row, T - len(e):] = torch.tensor(e), 1
        out, _ = full.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                               temperature=temperature, top_k=50, eos_token_id=eos)
        for row, e in zip(out.tolist(), enc):
            prompt, answer = e, row[T:]
            texts.append(prompt + (answer[:answer.index(eos) + 1] if eos in answer else answer))
        spent = time.time() - t0
        print(f"self-distillation: {len(texts)}/{n} answers, {spent:.0f} s, ~{spent * (n / len(texts) - 1):.0f} s "
              "left")
    cut = max(1, n // 10)
    return tuple(np.asarray([t for text in part for t in text], dtype=np.int32) for part in (texts[cut:], texts[:cut]))


if __name__ == "__main__":
    tune_routers(configurator.configure(globals()))

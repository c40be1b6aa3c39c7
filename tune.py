"""
Router tuning for a pretrained Hugging Face model, every base weight frozen, and the quality table of
bench.py --mode=ppl (perplexity through the adapter at matched layer calls, block influence, threshold search).

  python tune.py config/hf_smollm2.py --router=ffn # the built-in SmolLM2-135M on its own answers (see that file)
  python tune.py config/hf_router_tune.py          # a tiny dense model trained and exported here (see that file)
  python tune.py --hf=path/to/dir --dataset=my.txt --target_speedup=1.4
  python tune.py --help                            # every key, its default, what it does

What trains: the gates of hf_wrap.FrozenRouters, one kind per run (skip | ffn | expert_choice | token_choice;
router.py explains each). The tuning forward blends instead of deciding: unit u's update is scaled by its continue
weight w_u, x <- x + w_u * (unit(x) - x) (ffn: the MLP's update only; stand_in_rank > 0 adds (1 - w_u) *
stand_in_u(x), hf_wrap.StandIn, trained alongside). The loss: KL to the full model's next-token distribution (or
the LM loss) plus a compute penalty toward target_active_ratio; the last part of the run is 0/1 forward
(straight-through), so training ends on inference's decisions. Then, optionally, exit gates (CALM's confidence,
learned); each keep_ratio's calibrated cutoffs; the bias that gives target_speedup. hf_wrap.DepthAdapter then
really skips the work. All of it lands in out_dir/routers.pt (sample.py --routers, bench.py --routers).
exit_head_layer=l or drafter=True trains a speculative draft instead (speculative.py); self_distill=N tunes on
the model's own answers to N prompts (data.self_distill_ids): a draft learns best on the text it will draft.
A file of its own (README): it trains ~100k router parameters on someone else's frozen model, its own loop.
"""
import math
import os
import time

import torch
import torch.nn.functional as F

import configurator
import data
import hf_wrap
from data import corpus_ids, load_hf, text_windows
from hf_wrap import DepthAdapter
from speculative import tune_drafter, tune_exit_head     # speculative drafts: their file trains them

# -----------------------------------------------------------------------------
hf = "smollm2-135m"             # the frozen base: built-in name, local folder, .gguf file or hub name
out_dir = "out-hf-router-tune"  # routers.pt lands here
dataset = "shakespeare"         # encoded with the model's own tokenizer; or a path to a UTF-8 .txt file
seed = 1337
# the loop: 16 windows * 128 tokens = 2,048 tokens per step. The frozen base runs forward and backward (for the
# gates' gradients) but computes no weight gradients: a step costs ~2/3 of a training step of the base
batch_size = 16
block_size = 128
gradient_accumulation_steps = 1
max_iters = 300
eval_interval = 100
eval_iters = 4                  # held-out windows = eval_iters * batch_size (the val split, never tuned on)
log_interval = 25
calib_windows = 32              # train-split windows: keep_ratio cutoffs and the target search are measured here
router = "skip"                 # skip | ffn (MLP only, attention always runs) | expert_choice | token_choice
loss = "kl"                     # kl: match the full model's next-token distribution | lm: the text's next token
# where the gates sit: skip / ffn units (hf_wrap.unit_layout), expert / token-choice groups (hf_wrap.group_layout)
R = 4                           # expert_choice / token_choice: groups after base_layers
base_layers = 2                 # expert_choice / token_choice: layers every token runs
router_pattern = "every"        # every | every_other: which units in router_start..router_stop get a skip gate
router_start = 1                # first routed layer (>= 1: layer 0 always runs)
router_stop = -1                # routed layers stop before this one; < 0 counts from the end (-1: last layer locked on)
router_group = 1                # layers per routed unit (one gate skips them together)
router_mlp_hidden = 64          # gate MLP width (0 = a linear gate)
stand_in_rank = 0               # skip / ffn: > 0 gives each unit a trained stand-in (hf_wrap.StandIn, FlexiDepth's
                                # adapter) of this rank, for the tokens that pass over it (0 = they just skip)
# the loss: KL (or LM) + penalty_weight * max(mean weight - target_active_ratio, 0) + entropy
target_active_ratio = 0.6       # compute budget: the mean continue weight over routed layers and tokens
penalty_weight = 1.0            # lambda in LM loss + lambda * max(mean_gate - target_active_ratio, 0)
penalty_warmup_iters = 50       # lambda = 0 before this iteration
gate_entropy_weight = 0.1       # > 0 pushes soft weights toward 0/1, closer to the decisions made at inference
hard_gate_frac = 0.5            # the last fraction of max_iters runs 0/1 gates forward (straight-through gradients);
                                # without it soft gates learn "run every layer at partial strength" (README table)
# AdamW on the router parameters only, warmup then cosine (configurator.lr_at)
learning_rate = 2e-3            # only ~100k router parameters: a high rate is fine
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # 0 = off
# phase 2: exit gates, routers frozen
exit_layers = ()                # exit gates at these layers' inputs, e.g. (4, 6, 8); () = none
exit_iters = 0                  # exit-gate training steps (0 = no exits)
exit_threshold = 0.9            # a token exits when its exit gate's probability is above this
# last: keep_ratio cutoffs, and the bias that gives a compute target, by bisection on calibration text
keep_ratios = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9)   # skip / ffn / expert_choice: calibrated
target_speedup = 0.0            # > 0: search the bias for 1/target_speedup of the layer calls (0 = off)
target_mean_layers = 0.0        # or a target mean of layers per token (0 = off)
target_tol = 0.005              # the search stops within this of the target layer-call ratio
# a speculative draft instead of skip gates: an exit head (hf_wrap.ExitHead) trained by KL to the final layer
exit_head_layer = 0             # > 0: tune an exit head that reads the state entering this layer (0 = skip gates)
exit_head_rank = 128            # its low-rank residual adapter's width
exit_head_vocab = 8192          # tokens it (or the drafter) can propose: the tuning text's most frequent (0 = all)
exit_head_windows = 256         # train-split windows whose frozen-base states are computed once, then reused
# or a drafter (hf_wrap.Drafter) on the full model's final state, trained by KL to its next distributions
drafter = False                 # True: tune a drafter (exit_head_vocab and exit_head_windows apply to it too)
drafter_hidden = 512            # its MLP's width
drafter_steps = 3               # tokens ahead it is trained to draft in a row (each from its own previous state)
drafter_text = ""               # a dataset whose plain text also trains it: pydoc | shakespeare | a .txt path
# the text: the dataset's, or the model's own answers (self-distillation)
self_distill = 0                # > 0: tune on the model's answers to this many chat prompts built from the dataset's words
self_distill_tokens = 128       # new tokens per answer
self_distill_temperature = 0.7  # their sampling temperature (top-k 50); 0 = greedy
init_gates = "budget"           # budget: every gate at target_active_ratio | influence (skip / ffn): at the static
                                # drop (the units of lowest block influence off, the rest on, for every token)
init_from = ""                  # a routers.pt of the same kind and units: start from its gates (max_iters=0 with
                                # exit_layers: add exit gates to trained routers without retraining them)
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"                  # auto (bf16 on CUDA, else float32) | float32 | bfloat16 | float16
# -----------------------------------------------------------------------------
_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, configurator.CONFIG_TYPES)}


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
    """The tuning forward: teacher forcing on whole sequences with continue weights instead of decisions. Unit u
    of `routers` (hf_wrap.FrozenRouters) gets w_u (B, T, 1) from the state entering it; its update is scaled by w_u
    (ffn: each MLP's update). HF's own decoder layers run it with explicit causal / sliding masks (ffn: their
    attention and MLP separately). routers=None: the model itself.

    ids (B, T) -> logits (B, T, V), the weights (B, T, U) float32 (None without routers), {exit layer: the state
    entering it (B, T, C)}. influence: a list to append, per layer, sum over tokens of 1 - cos(x_in, x_out).
    hard: 0/1 weights forward, the soft ones' gradient backward (straight-through)."""
    inner = model.model
    B, T = ids.shape
    x = inner.embed_tokens(ids)                                               # (B, T, C)
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    rope = inner.rotary_emb(x, pos)                                           # (cos, sin) (B, T, hd) each
    masks, weights, states, carry = {}, [], {}, None
    for l, layer in enumerate(inner.layers):
        if routers is not None and l in routers.exit_at:
            states[l] = x
        u = None if routers is None else routers.unit_of.get(l)
        if u is not None and routers.units[u][0] == l:                        # a unit starts: its weight, its input
            w, carry = routers.continue_weights(u, x, carry, hard)
            weights.append(w)
            w, x_unit = w.to(x.dtype), x
        window = hf_wrap.layer_window(model.config, l)
        if window not in masks:
            masks[window] = _causal_mask(T, window, x)
        x_in = x
        if u is not None and routers.kind == "ffn":                           # attention in full, the MLP weighted
            h = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=masks[window],
                                    position_ids=pos, position_embeddings=rope)[0]
            x = h + w * layer.mlp(layer.post_attention_layernorm(h))
            if routers.stand_ins is not None:                                 # the MLP's stand-in, for the rest
                x = x + (1 - w) * routers.stand_ins[u](h)
        else:
            x = layer(x, attention_mask=masks[window], position_ids=pos, position_embeddings=rope)
        if influence is not None:
            influence.append(float((1 - F.cosine_similarity(x_in.float(), x.float(), dim=-1)).sum()))
        if u is not None and routers.kind != "ffn" and l == routers.units[u][1] - 1:
            x = x_unit + w * (x - x_unit)                                     # the unit's update, weighted
            if routers.stand_ins is not None:                                 # and its stand-in's, for the rest
                x = x + (1 - w) * routers.stand_ins[u](x_unit)
    logits = model.get_output_embeddings()(inner.norm(x))
    return logits, (torch.cat(weights, -1).float() if weights else None), states


def _tuning_loss(logits, Y, weights, cfg, it, sizes=None, full_logits=None):
    """KL(full || routed) on the next-token distributions (loss='kl', full_logits given) or the LM loss on Y,
    + lambda * max(mean weight - target_active_ratio, 0) (lambda = 0 during warm-up) + the weights' entropy.
    The mean weight pools every unit and token, each unit counted by its layers (sizes): the routers choose WHICH
    units to skip for which tokens; only the average is held to the budget. The entropy term pushes weights toward
    0 or 1, narrowing the gap to the 0/1 decisions of inference. -> (loss, {name: float})."""
    if full_logits is not None:
        logp_full = F.log_softmax(full_logits.float(), -1)
        fit = (logp_full.exp() * (logp_full - F.log_softmax(logits.float(), -1))).sum(-1).mean()
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
# The tuning loop

def tune_routers(cfg):
    """Router tuning for a pretrained model, every base weight frozen. cfg: default_config(...) or the script's.

    Phase 1: the gates of hf_wrap.FrozenRouters(cfg['router']) trained through soft_forward and _tuning_loss for
    max_iters steps. Phase 2 (with exit_layers and exit_iters > 0): the gates are frozen and each exit gate learns,
    by BCE, whether the state at its layer, through the final norm and LM head, already gives the routed model's
    final argmax (CALM's consistency target, learned: the gate sees only the state). Then the per-unit cutoffs of
    each of keep_ratios, calibrated through the adapter (DepthAdapter.calibrate), and with target_speedup (or
    target_mean_layers) a bisection on the bias until the layer-call ratio measured through the adapter on
    calibration text is within target_tol of the target. Everything lands in out_dir/routers.pt (atomic).
    """
    if int(os.environ.get("RANK", -1)) != -1:
        raise SystemExit("error: router tuning runs in one process (the base is frozen and the routers are tiny): "
                         "run python tune.py ..., not torchrun.")
    name = cfg["hf"]
    if not name:
        raise SystemExit("error: hf='' names no model: --hf=smollm2-135m (built in), --hf=path/to/dir "
                         "(save_pretrained or sample.py --export_hf output), a .gguf file or a hub name.")
    for key, ok, what in [("target_active_ratio", 0 < cfg["target_active_ratio"] <= 1, "a fraction in (0, 1]"),
                          ("penalty_weight", cfg["penalty_weight"] >= 0, ">= 0"),
                          ("target_speedup", cfg["target_speedup"] == 0 or cfg["target_speedup"] >= 1,
                           "0 (off) or >= 1 (1.6 = 1.6x fewer layer calls)"),
                          ("router_mlp_hidden", cfg["router_mlp_hidden"] >= 0, ">= 0 (0 = a linear gate)"),
                          ("router", cfg["router"] in hf_wrap.ROUTER_KINDS, f"one of {', '.join(hf_wrap.ROUTER_KINDS)}"),
                          ("loss", cfg["loss"] in ("kl", "lm"), "'kl' or 'lm'"),
                          ("init_gates", cfg["init_gates"] == "budget" or (cfg["init_gates"] == "influence" and
                           cfg["router"] in ("skip", "ffn") and not cfg["init_from"]), "'budget', or 'influence' "
                           "(skip / ffn gates start at the static drop; not with init_from)"),
                          ("stand_in_rank", isinstance(cfg["stand_in_rank"], int) and cfg["stand_in_rank"] >= 0
                           and (cfg["stand_in_rank"] == 0 or (cfg["router"] in ("skip", "ffn")
                                                               and cfg["router_group"] == 1)),
                           "an int >= 0, and 0 unless router is skip or ffn with router_group=1 (one stand-in per "
                           "one-layer unit)"),
                          ("drafter_hidden", cfg["drafter_hidden"] >= 1, "an int >= 1 (512 is a good start)"),
                          ("drafter_steps", cfg["drafter_steps"] >= 1, "an int >= 1 (3: trained to draft 3 ahead)"),
                          ("exit_head_windows", cfg["exit_head_windows"] >= 1, "an int >= 1"),
                          ("drafter", not (cfg["drafter"] and cfg["exit_head_layer"]), "False with exit_head_layer > 0 "
                           "(each tunes a speculative draft: pick one)"),
                          ("self_distill_temperature", cfg["self_distill_temperature"] >= 0, ">= 0 (0 = greedy)")]:
        if not ok:
            raise SystemExit(f"error: {key}={cfg[key]!r}: must be {what}.")
    torch.manual_seed(cfg["seed"])
    device = configurator.autodetect_device(cfg["device"])
    _, dtype = configurator.autocast_context(device.split(":")[0], cfg["dtype"])          # bf16 on CUDA, float32 elsewhere
    model, tok = load_hf(name, device=device, dtype=dtype)                    # the frozen base holds this dtype
    mc = model.config
    if mc.model_type not in hf_wrap.SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"error: {name} is a {mc.model_type!r} model; router tuning and DepthAdapter support "
                         f"Llama-family decoders: {', '.join(hf_wrap.SUPPORTED_MODEL_TYPES)}.")
    if tok is None:
        raise SystemExit(f"error: {name} has no tokenizer: router tuning encodes its text with the model's own.")
    model.requires_grad_(False)                                               # frozen: only routers get gradients
    L = mc.num_hidden_layers
    kind = cfg["router"]
    try:
        units = (hf_wrap.group_layout(L, cfg["R"], cfg["base_layers"]) if kind in ("expert_choice", "token_choice") else
                 hf_wrap.unit_layout(L, cfg["router_pattern"], cfg["router_start"], cfg["router_stop"], cfg["router_group"]))
        # the gates start at the budget: every weight = target_active_ratio (expert-choice: its product over the
        # units averages about that; token-choice starts at full depth), so the penalty has nothing to undo
        p = cfg["target_active_ratio"] ** (2 / (len(units) + 1) if kind == "expert_choice" else 1)
        init = hf_wrap.GATE_INIT_LOGIT if kind == "token_choice" or p >= 0.99 else math.log(p / (1 - p))
        routers = hf_wrap.FrozenRouters(kind, mc.hidden_size, units, cfg["exit_layers"], cfg["router_mlp_hidden"], init,
                                   cfg["stand_in_rank"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg["init_from"]:                                  # trained gates to start from (new exit gates stay fresh)
        try:
            start, blob = hf_wrap.load_routers(cfg["init_from"], mc)
        except ValueError as e:
            raise SystemExit(f"error: init_from: {e}") from None
        if (start.kind, start.units, start.stand_in_rank) != (kind, routers.units, routers.stand_in_rank):
            raise SystemExit(f"error: init_from={cfg['init_from']} holds {start.kind} routers over units {start.units}"
                             f" with stand_in_rank={start.stand_in_rank}; this run trains {kind} over {routers.units} "
                             f"with stand_in_rank={routers.stand_in_rank}.")
        routers.gates.load_state_dict(start.gates.state_dict())
        if routers.stand_ins is not None:
            routers.stand_ins.load_state_dict(start.stand_ins.state_dict())
    routers, exit_layers = routers.to(device), routers.exit_layers
    sizes = torch.tensor([float(b - a) for a, b in units], device=device)   # layers under each unit
    block = cfg["block_size"]
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and block > max_pos:
        raise SystemExit(f"error: block_size={block} exceeds {name}'s context ({max_pos}): lower block_size.")
    if cfg["self_distill"]:
        train_ids, val_ids = data.self_distill_ids(model, tok, cfg["dataset"], cfg["self_distill"],
                                              cfg["self_distill_tokens"], cfg["seed"], cfg["batch_size"],
                                              cfg["self_distill_temperature"])
    else:
        train_ids, val_ids = corpus_ids(tok, cfg["dataset"])
    if max(int(train_ids.max()), int(val_ids.max())) >= mc.vocab_size:
        raise SystemExit(f"error: the tokenizer gives ids beyond the model's vocab_size={mc.vocab_size}.")
    B, accum = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    gen, calib_gen = torch.Generator().manual_seed(cfg["seed"]), torch.Generator().manual_seed(cfg["seed"] + 2)
    calib = text_windows(train_ids, block, cfg["calib_windows"], calib_gen)   # thresholds are set on these
    val = text_windows(val_ids, block, cfg["eval_iters"] * B)                 # held out: reported, never tuned on
    if cfg["init_gates"] == "influence":
        # start where static drop is (ShortGPT): the units that turn the residual stream least are off for every
        # token, the rest on, at the budget; training then lets each token choose. Gates' weights start at 0.
        bi = block_influence(model, calib, B)
        unit_bi = [sum(bi[a:b]) / (b - a) for a, b in units]
        n_off = round((1 - cfg["target_active_ratio"]) * len(units))
        off = set(sorted(range(len(units)), key=lambda u: unit_bi[u])[:n_off])
        for u, g in enumerate(routers.gates):
            (g.net[-1] if cfg["router_mlp_hidden"] else g.net).bias.data.fill_(
                -hf_wrap.GATE_INIT_LOGIT if u in off else hf_wrap.GATE_INIT_LOGIT)
        print(f"gates start at the static drop of units {sorted(units[u] for u in off)} (lowest block influence)")
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "routers.pt")
    if cfg["self_distill"]:                     # the answers as text, for another tuning run: --dataset=this file
        with open(os.path.join(out_dir, "self_distill.txt"), "w", encoding="utf-8") as f:
            f.write(tok.decode(train_ids.tolist() + val_ids.tolist()))
    if cfg["exit_head_layer"]:
        return tune_exit_head(cfg, model, train_ids, val, path)
    if cfg["drafter"]:
        extra = corpus_ids(tok, cfg["drafter_text"])[0] if cfg["drafter_text"] else None
        return tune_drafter(cfg, model, train_ids, val, path, extra)
    routed = int(sizes.sum())
    print(f"router tuning for {name} ({mc.model_type}, {L} layers, base frozen): {kind} routers, {len(units)} units over "
          f"{routed} routed layers (units {units}), exit gates at {exit_layers or 'none'}; "
          f"{sum(p.numel() for p in routers.parameters()):,} trainable parameters; "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens")
    # every unit at target_active_ratio would run this fraction of all layer calls (ffn: of the MLPs)
    print(f"target_active_ratio {cfg['target_active_ratio']} of routed units ~ a {'MLP' if kind == 'ffn' else 'layer'}"
          f"-call ratio of {(L - routed + cfg['target_active_ratio'] * routed) / L:.3f}")

    def adapter(bias=0.0, exits=False, **kw):
        return DepthAdapter(model, router=kind, routers=routers, bias=bias, exits=exits,
                            exit_threshold=cfg["exit_threshold"], **kw)

    def batches(windows, size=B):
        for i in range(0, len(windows), size):
            w = windows[i:i + size].to(device)
            yield w[:, :-1], w[:, 1:]

    @torch.no_grad()
    def evaluate(it):
        """Val loss of the full model (once) and with soft weights; decided (bias 0) perplexity through the adapter."""
        routers.eval()
        soft = [F.cross_entropy(soft_forward(model, routers, X)[0].flatten(0, 1).float(), Y.flatten(),
                                reduction="sum").item() / Y.numel() * len(X) for X, Y in batches(val)]
        hard = eval_ppl(adapter(), val, B)
        routers.train()
        print(f"step {it}: val loss full depth {full_val:.4f}, soft weights {sum(soft) / len(val):.4f} | decided "
              f"(bias 0): val ppl {hard['ppl']:.3f} (full {math.exp(full_val):.3f}) at layer-call ratio "
              f"{hard['layer_ratio']:.3f}")
        return {"iter": it, "val_loss_soft": sum(soft) / len(val), "val_ppl_bias0": hard["ppl"],
                "layer_ratio_bias0": hard["layer_ratio"]}

    def save(**extra):
        meta = {"model": name, "config": cfg, "bias": 0.0, "exit_threshold": cfg["exit_threshold"],
                "exits_trained": False, "full_val_loss": full_val, **state, **extra}
        hf_wrap.save_routers(path, routers, mc, **meta)

    full_val, state = eval_ppl(DepthAdapter(model), val, B)["nll"], {}   # per token, like every number here

    # ---- phase 1: the gates, soft then straight-through ----------------------------------------------------
    trained = [p for m in (routers.gates, routers.stand_ins) if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(trained, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                            weight_decay=cfg["weight_decay"])
    routers.train()
    t0 = time.time()
    for it in range(cfg["max_iters"] + 1):
        if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
            state["last_eval"] = evaluate(it)
            if it > 0:
                save(iter_num=it)
        if it == cfg["max_iters"]:
            break
        for group in opt.param_groups:
            group["lr"] = configurator.lr_at(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["max_iters"])
        hard = it >= (1 - cfg["hard_gate_frac"]) * cfg["max_iters"]            # the last part: straight-through
        for _ in range(accum):
            X, Y = data.get_batch(train_ids, B, block, gen, device)
            full_logits = None
            if cfg["loss"] == "kl":
                with torch.no_grad():
                    full_logits = soft_forward(model, None, X)[0]             # the full model: what to keep
            logits, weights, _ = soft_forward(model, routers, X, hard=hard)
            loss, parts = _tuning_loss(logits, Y, weights, cfg, it, sizes, full_logits)
            (loss / accum).backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(routers.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % cfg["log_interval"] == 0:
            dt = (time.time() - t0) / cfg["log_interval"]
            t0 = time.time()
            print(f"iter {it + 1}: loss {loss.item():.4f} ({cfg['loss']} {parts['fit']:.4f}, penalty "
                  f"{parts['penalty']:.4f}, entropy {parts['entropy']:.3f}), mean {'hard' if hard else 'soft'} "
                  f"weight {parts['mean_weight']:.3f} (target {cfg['target_active_ratio']}), lr {group['lr']:.2e}, "
                  f"{1000 * dt:.0f} ms/iter")
    routers.eval()
    routers.requires_grad_(False)

    with torch.no_grad():
        w = torch.cat([soft_forward(model, routers, X)[1].flatten(0, 1) for X, _ in batches(calib)])
    state["unit_mean_weight"] = w.mean(0).tolist()
    print("mean continue weight per unit on calibration text: "
          + ", ".join(f"{a}-{b - 1}: {g:.2f}" for (a, b), g in zip(units, state["unit_mean_weight"])))
    save(iter_num=cfg["max_iters"])

    # ---- phase 2: exit gates, routers frozen -------------------------------------------------------------------
    exits_trained = bool(exit_layers) and cfg["exit_iters"] > 0
    if exits_trained:
        opt = torch.optim.AdamW(routers.exits.parameters(), lr=cfg["learning_rate"],
                                betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])
        routers.exits.requires_grad_(True)
        head, norm = model.get_output_embeddings(), model.model.norm
        t0 = time.time()
        for it in range(cfg["exit_iters"]):
            for group in opt.param_groups:
                group["lr"] = configurator.lr_at(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["exit_iters"])
            X, _ = data.get_batch(train_ids, B, block, gen, device)
            with torch.no_grad():                                             # the model and routers: fixed
                logits, _, states = soft_forward(model, routers, X)
                final = logits.argmax(-1)                                     # (B, T) what continuing gives
                target = {l: (head(norm(h)).argmax(-1) == final).float() for l, h in states.items()}
            loss = sum(F.binary_cross_entropy_with_logits(routers.exits[i](states[l])[..., 0], target[l])
                       for l, i in routers.exit_at.items()) / len(exit_layers)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (it + 1) % cfg["log_interval"] == 0 or it + 1 == cfg["exit_iters"]:
                dt = (time.time() - t0) / cfg["log_interval"]
                t0 = time.time()
                agree = ", ".join(f"layer {l}: {target[l].mean().item():.2f}" for l in exit_layers)
                print(f"exit iter {it + 1}: BCE {loss.item():.4f}, intermediate argmax already final: {agree}, "
                      f"{1000 * dt:.0f} ms/iter")
        routers.eval()
        routers.requires_grad_(False)
        state["exits_trained"] = True

    # ---- keep_ratio: per-unit cutoffs calibrated through the adapter (token-choice has none) -----------------
    if kind != "token_choice":
        state["cutoffs"] = {}
        for kr in cfg["keep_ratios"]:
            cut = adapter(exits=exits_trained, keep_ratio=kr).calibrate(calib[:, :-1].to(device))
            state["cutoffs"][f"{kr:.2f}"] = cut.tolist()
        print(f"calibrated cutoffs for keep_ratio {', '.join(state['cutoffs'])}")

    # ---- target speedup: bisection on the bias -----------------------------------------------------------------
    bias = 0.0
    target = (1 / cfg["target_speedup"] if cfg["target_speedup"] else cfg["target_mean_layers"] / L
              if cfg["target_mean_layers"] else None)
    if target is not None:
        make = lambda v: adapter(v, exits=exits_trained)
        bias, found, reached = search_cutoff(lambda v: eval_ppl(make(v), calib, B), -30.0, 30.0, target,
                                             cfg["target_tol"])
        held = eval_ppl(make(bias), val, B)
        print(f"target layer-call ratio {target:.3f} (speedup {1 / target:.2f}x in layer calls): bias "
              f"{bias:.4g} gives {found['layer_ratio']:.3f} on calibration text"
              f"{'' if reached else ' (the closest reachable: not within target_tol)'}; held-out text: ratio "
              f"{held['layer_ratio']:.3f}, ppl {held['ppl']:.3f} vs full depth {math.exp(full_val):.3f} "
              f"({100 * (held['ppl'] / math.exp(full_val) - 1):+.1f}%)")
        state["target"] = {"layer_ratio": target, "calib_ratio": found["layer_ratio"], "reached": reached,
                           "val_ratio": held["layer_ratio"], "val_ppl": held["ppl"]}
    save(iter_num=cfg["max_iters"], bias=bias)
    print(f"saved {path}\n  python sample.py --routers {path} --prompt 'Explain gravity simply.' "
          "--return_depth_trace")


# -----------------------------------------------------------------------------
# Quality at matched compute: perplexity, block influence, threshold search (bench.py --mode=ppl uses these)

@torch.no_grad()
def eval_ppl(adapter, windows, batch_size=8, keep_argmax=False, reference=None):
    """Teacher-forced perplexity of `windows` (N, T + 1) through adapter.prefill_logits (what generation computes),
    and the work it took, each over tokens * L: layer_ratio (layer calls; attention alone counts its share),
    kv_ratio (K/V-only work, in layers), head_ratio (the LM-head calls of confidence / entropy exits, in layers).
    keep_argmax: also return each batch's greedy tokens; reference (such a list, from full depth): agree = the
    fraction of positions whose greedy token is the reference's."""
    dev = adapter.embed.weight.device
    nll = calls = kv = head = n = same = 0
    argmax = []
    for j, i in enumerate(range(0, len(windows), batch_size)):
        w = windows[i:i + batch_size].to(dev)
        logits, st = adapter.prefill_logits(w[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
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
    """ShortGPT's block influence per layer, BI_l = 1 - mean over tokens of cos(layer input, layer output), on the
    full model over calibration windows. Low BI: the layer barely turns the residual stream. -> list of L floats."""
    dev = model.get_input_embeddings().weight.device
    total, n = None, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size, :-1].to(dev)
        bi = []
        soft_forward(model, None, w, influence=bi)
        total = bi if total is None else [a + b for a, b in zip(total, bi)]
        n += w.numel()
    return [t / n for t in total]


def static_drop_layers(influence, n):
    """The n layers with the lowest block influence, never layer 0 (ShortGPT's static layer removal)."""
    order = sorted(range(1, len(influence)), key=lambda l: influence[l])
    return sorted(order[:n])


def search_cutoff(measure, lo, hi, target, tol=0.005, iters=40):
    """Bisection on a router's threshold until measure(v)['layer_ratio'] is within tol of `target`. The ratio
    must be monotone in v (either direction). -> (v, measure(v), reached). A target out of reach gives the closer
    end and reached=False; a ratio that jumps over the target (few tokens, or a discrete router) gives the closest
    value seen. measure: e.g. lambda v: eval_ppl(make(v), calib) (a DepthAdapter per v), or exit_ratio."""
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


# CALM's training-free exits, measured once on the full model (quality_table's cheap threshold search)

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


def quality_table(model, tok, trained, names, depths, T, batch_size, calib_windows, ppl_windows, seed, target_tol,
                  emit=lambda row: None):
    """bench.py --mode=ppl's rows. For each target depth f in depths: drop n = round((1 - f) * L) layers
    statically (the n lowest block influences, never layer 0) and match every adaptive method to that same
    layer-call ratio (L - n) / L, each by a bisection on its own threshold over calibration text (the train split
    of names[0]): CALM's confidence and entropy exits, and each trained router of `trained` ([(FrozenRouters,
    file dict)]). Then perplexity, greedy agreement with full depth and the work actually done on the held-out
    split of every dataset in names. Progress lines as it goes; emit(row) as each row exists. -> (rows, calib)."""
    L = model.config.num_hidden_layers
    train_ids, _ = data.corpus_ids(tok, names[0])
    calib = data.text_windows(train_ids, T, calib_windows, torch.Generator().manual_seed(seed + 2))
    held = {d: data.text_windows(data.corpus_ids(tok, d)[1], T, ppl_windows) for d in names}
    bs, t_start = batch_size, time.time()

    def progress(what):
        print(f"[{time.time() - t_start:6.0f} s] {what}", flush=True)

    influence = block_influence(model, calib, bs)
    progress("block influence per layer (1 - cos(in, out), calibration text): "
             + " ".join(f"{l}:{b:.3f}" for l, b in enumerate(influence)))
    full = {d: eval_ppl(DepthAdapter(model), held[d], bs, keep_argmax=True) for d in names}
    table = [{"text": d, "target depth": "100%", "method": "full depth", "setting": "-", "ratio": 1.0,
              "kv-only %": 0.0, "head checks %": 0.0, "ppl": full[d]["ppl"], "vs full %": 0.0, "agree %": 100.0}
             for d in names]
    for r in table:
        emit(r)
    # CALM's exits, searched cheaply: each token's top-1 probability and entropy at every layer of the FULL
    # model, once; a threshold's layer-call ratio is then a lookup. (Exited tokens change later tokens' states
    # only through their K/V, so the real ratio, measured below on held-out text, lands close.)
    stats = exit_statistics(model, calib, bs)
    progress("exit statistics at every layer on calibration text")

    def row(depth, method, setting, ad):
        for d in names:
            r = eval_ppl(ad, held[d], bs, reference=full[d]["argmax"])
            table.append({"text": d, "target depth": f"{100 * depth:.0f}%", "method": method, "setting": setting,
                          "ratio": r["layer_ratio"], "kv-only %": 100 * r["kv_ratio"],
                          "head checks %": 100 * r["head_ratio"], "ppl": r["ppl"],
                          "vs full %": 100 * (r["ppl"] / full[d]["ppl"] - 1), "agree %": 100 * r["agree"]})
            emit(table[-1])
        progress(f"{100 * depth:.0f}%: {method} ({setting}): ppl " + ", ".join(
            f"{r['text']} {r['ppl']:.2f} at ratio {r['ratio']:.3f}" for r in table[-len(names):]))

    for depth in depths:
        n_drop = min(L - 1, max(1, round((1 - depth) * L)))
        target = (L - n_drop) / L                      # the static row's exact ratio: everyone matches it
        drop = static_drop_layers(influence, n_drop)
        row(depth, "static drop (ShortGPT)", f"layers {drop}", DepthAdapter(model, router="drop", drop_layers=drop))
        for kind, lo, hi in (("confidence", 1e-6, 1.0), ("entropy", 0.0, 12.0)):      # exit at any layer
            v, _, ok = search_cutoff(lambda v: exit_ratio(stats, kind, v), lo, hi, target, target_tol)
            row(depth, f"{kind} exit (training-free)", f"threshold {v:.4g}" + ("" if ok else " (target missed)"),
                DepthAdapter(model, router=kind, R=L - 1, base_layers=1, threshold=v))
        for module, blob in trained:
            make = lambda v: DepthAdapter(model, router=module.kind, routers=module, bias=v,
                                          exits=bool(blob.get("exits_trained")))
            v, _, ok = search_cutoff(lambda v: eval_ppl(make(v), calib, bs), -30.0, 30.0, target, target_tol)
            row(depth, f"trained {module.kind}", f"bias {v:.4g}" + ("" if ok else " (target missed)"), make(v))
    return table, calib


if __name__ == "__main__":
    tune_routers(configurator.configure(globals()))

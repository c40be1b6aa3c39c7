"""
Router tuning for a pretrained Hugging Face model, every base weight frozen, and the quality-at-matched-compute
helpers that bench.py --mode=ppl uses (perplexity through the adapter, block influence, threshold search).

  python tune.py                                   # the built-in SmolLM2-135M, Shakespeare's training plays
  python tune.py config/hf_router_tune.py          # a tiny dense model trained and exported here (see that file)
  python tune.py --hf=path/to/dir --dataset=my.txt --target_speedup=1.4
  python tune.py --help                            # every key, its default, what it does

What trains: a small MLP gate before each routed layer (hf_wrap.SkipRouters, MindSkip): the tuning forward blends
g * layer(x) + (1 - g) * x with g = sigmoid(gate logit) per token, and the loss is the LM loss plus a compute
penalty toward target_active_ratio; then, optionally, exit gates at a few layers (CALM's learned confidence).
At inference hf_wrap.DepthAdapter(router='skip') turns each gate into a hard threshold and really skips the
layer. Everything lands in out_dir/routers.pt, which sample.py --routers and bench.py --routers read.

With exit_head_layer=l it trains a speculative draft instead (hf_wrap.ExitHead: a small adapter and the model's
own LM head at layer l's input), by KL divergence to the final layer's distribution: sample.py --speculative=K
--routers=out_dir/routers.pt then drafts with it and the full model verifies. self_distill=N tunes on the model's
own answers to N prompts instead of the dataset's text: a draft learns best on the text it will draft.

A file of its own, not a mode of train.py: train.py trains our models from scratch; this trains ~100k router
parameters on someone else's frozen model, with its own settings (below) and its own loop.
"""
import math
import os
import time

import torch
import torch.nn.functional as F

import configurator
import data
import hf_wrap
from hf_wrap import DepthAdapter, SkipRouters, load_hf, save_skip_routers, skip_layout
from model import lr_at

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
calib_windows = 32              # train-split windows: gate quantiles and the target search are measured here
# where the gates sit (hf_wrap.skip_layout)
router_pattern = "every"        # every | every_other: which units in router_start..router_stop get a skip gate
router_start = 1                # first routed layer (>= 1: layer 0 always runs)
router_stop = -1                # routed layers stop before this one; < 0 counts from the end (-1: last layer locked on)
router_group = 1                # layers per routed unit (one gate skips them together)
router_mlp_hidden = 64          # gate MLP width (0 = a linear gate)
# the loss: LM + penalty_weight * max(mean_gate - target_active_ratio, 0) + z-loss + entropy
target_active_ratio = 0.6       # compute budget: the mean soft gate over units and tokens
penalty_weight = 1.0            # lambda in LM loss + lambda * max(mean_gate - target_active_ratio, 0)
penalty_warmup_iters = 50       # lambda = 0 before this iteration
gate_z_weight = 0.0             # z-loss on the gate logits (keeps them small)
gate_entropy_weight = 0.1       # > 0 pushes soft gates toward 0/1, closer to the hard threshold used at inference
hard_gate_frac = 0.5            # the last fraction of max_iters runs 0/1 gates forward (straight-through gradients);
                                # without it soft gates learn "run every layer at partial strength" (README table)
# AdamW on the router parameters only, warmup then cosine (model.lr_at)
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
# last: the hard threshold that gives a compute target, by bisection on calibration text
target_speedup = 0.0            # > 0: search the hard threshold for 1/target_speedup of the layer calls (0 = off)
target_mean_layers = 0.0        # or a target mean of layers per token (0 = off)
target_tol = 0.005              # the search stops within this of the target layer-call ratio
# a speculative draft instead of skip gates: an exit head (hf_wrap.ExitHead) trained by KL to the final layer
exit_head_layer = 0             # > 0: tune an exit head that reads the state entering this layer (0 = skip gates)
exit_head_rank = 128            # its low-rank residual adapter's width
exit_head_vocab = 8192          # tokens it can propose: the most frequent ones of the tuning text (0 = all)
exit_head_windows = 256         # train-split windows whose frozen-base states are computed once, then reused
# the text: the dataset's, or the model's own answers (self-distillation)
self_distill = 0                # > 0: tune on the model's answers to this many chat prompts built from the dataset's words
self_distill_tokens = 128       # new tokens per answer (sampled at temperature 0.7, top-k 50)
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
# Text: data.py's train/val split, encoded with the pretrained model's own tokenizer

def corpus_ids(tokenizer, dataset="shakespeare"):
    """(train ids, val ids) as int32 numpy arrays: data.train_val_text's split (the built-in plays split by play,
    so validation is text the routers never saw), encoded by the model's OWN tokenizer (a model exported from a
    char checkpoint carries its char tokenizer, so the built-in corpus works offline)."""
    import numpy as np
    out = []
    for text in data.train_val_text(dataset):
        try:
            ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        except Exception as e:
            raise SystemExit(f"error: the model's tokenizer cannot encode dataset={dataset!r} "
                             f"({type(e).__name__}: {str(e)[:160]}).") from None
        out.append(np.asarray(ids, dtype=np.int32))
    return tuple(out)


def text_windows(ids, block_size, n, generator=None):
    """(n, block_size + 1) int64: n windows (inputs + next-token targets) of a token array, back to back from the
    start (deterministic: held-out text), or at random offsets drawn with `generator` (calibration text)."""
    span = block_size + 1
    if len(ids) < span:
        raise SystemExit(f"error: the text has {len(ids)} tokens; a window needs block_size + 1 = {span}.")
    if generator is None:
        n = min(n, len(ids) // span)
        starts = [i * span for i in range(n)]
    else:
        starts = torch.randint(len(ids) - span + 1, (n,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(ids[s:s + span].astype("int64")) for s in starts])


SELF_PROMPTS = ("Explain {} simply.", "Write a short paragraph about {}.", "What do you know about {}?",
                "Give three facts about {}.", "Tell me a short story about {}.", "Why does {} matter?")


def self_distill_ids(model, tokenizer, dataset, n, new_tokens, seed, batch_size):
    """The model's own answers as tuning text (self-distillation: a draft learns the text it will be asked to
    draft). n chat prompts, each a template of SELF_PROMPTS around a word drawn from the dataset's training
    text; answers sampled at temperature 0.7 (top-k 50) through DepthAdapter at full depth. -> (train ids, val
    ids) as corpus_ids gives: prompt, answer, eos, back to back; the last tenth of the answers held out."""
    import re
    import numpy as np
    words = sorted(set(re.findall(r"[a-z]{5,}", data.train_val_text(dataset)[0].lower())))
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
        out, _ = full.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens, temperature=0.7,
                               top_k=50, eos_token_id=eos)
        for row, e in zip(out.tolist(), enc):
            prompt, answer = e, row[T:]
            texts.append(prompt + (answer[:answer.index(eos) + 1] if eos in answer else answer))
        print(f"self-distillation: {len(texts)}/{n} answers, {time.time() - t0:.0f} s")
    cut = max(1, n // 10)
    return tuple(np.asarray([t for text in part for t in text], dtype=np.int32) for part in (texts[cut:], texts[:cut]))


# -----------------------------------------------------------------------------
# The tuning forward (soft gates) and its loss

def _causal_mask(T, window, like):
    """(1, 1, T, T) additive mask for a whole sequence: causal, and inside the sliding window if any."""
    i = torch.arange(T, device=like.device)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok = ok & (i[None, :] > i[:, None] - window)
    return torch.zeros(T, T, dtype=like.dtype, device=like.device).masked_fill_(~ok, -math.inf)[None, None]


def _gate(logit, hard=False):
    """Gate value from its logit: soft sigmoid(logit), or with hard=True the 0/1 decision inference makes at
    threshold 0.5 in the forward pass and the sigmoid's gradient in the backward (straight-through)."""
    g = torch.sigmoid(logit)
    return g if not hard else (logit > 0).to(g.dtype) + g - g.detach()


def soft_forward(model, routers, ids, influence=None, hard=False):
    """The tuning forward: teacher forcing on whole sequences with SOFT gates (MindSkip). A routed unit's output is
    g * unit(x) + (1 - g) * x, g = sigmoid(gate logit) (B, T, 1) per token, so the LM loss tells each gate what
    skipping costs. HF's own decoder layers run it (explicit causal / sliding masks), not the adapter: the hard
    routing at inference is the adapter's prefill/decode path. routers=None: the model itself.

    ids (B, T) -> logits (B, T, V), gate logits (B, T, U) float32 (None without routers), {exit layer: state at
    its input (B, T, C)}. influence: a list to append, per layer, sum over tokens of 1 - cos(x_in, x_out).
    hard: straight-through gates (_gate): the forward is the hard routing, the gradient the soft one's.
    """
    inner = model.model
    B, T = ids.shape
    x = inner.embed_tokens(ids)                                               # (B, T, C)
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    rope = inner.rotary_emb(x, pos)                                           # (cos, sin) (B, T, hd) each
    masks, gate_logits, states = {}, [], {}
    for l, layer in enumerate(inner.layers):
        if routers is not None and l in routers.exit_at:
            states[l] = x
        if routers is not None and l in routers.unit_at:                      # a unit starts: its gate, its input
            logit = routers.gates[routers.unit_at[l]](x)                      # (B, T, 1) float32
            gate_logits.append(logit)
            g, x_unit = _gate(logit, hard).to(x.dtype), x
        window = DepthAdapter._window(model.config, l)
        if window not in masks:
            masks[window] = _causal_mask(T, window, x)
        x_in, x = x, layer(x, attention_mask=masks[window], position_ids=pos, position_embeddings=rope)
        if influence is not None:
            influence.append(float((1 - F.cosine_similarity(x_in.float(), x.float(), dim=-1)).sum()))
        if routers is not None and l in routers.unit_end:
            x = x_unit + g * (x - x_unit)                                     # g * unit(x) + (1 - g) * x
    logits = model.get_output_embeddings()(inner.norm(x))
    return logits, (torch.cat(gate_logits, -1) if gate_logits else None), states


def _tuning_loss(logits, Y, gate_logits, cfg, it, hard=False):
    """LM loss + lambda * max(mean gate - target_active_ratio, 0) (lambda = 0 during warm-up) + z-loss + entropy.
    The mean gate pools every unit and token: the routers choose WHICH layers to skip for which tokens; only the
    average is held to the budget. The entropy term (weight > 0) pushes gates toward 0 or 1, narrowing the gap
    between soft gates in training and the hard threshold at inference; hard (straight-through) closes it: the
    penalty then sees the fraction of units that really run. -> (loss, {name: float})."""
    lm = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten())
    g = torch.sigmoid(gate_logits)
    mean_gate = _gate(gate_logits, hard).mean()
    lam = cfg["penalty_weight"] if it >= cfg["penalty_warmup_iters"] else 0.0
    penalty = F.relu(mean_gate - cfg["target_active_ratio"])
    z = gate_logits.pow(2).mean()                                             # one logit: its logsumexp is itself
    # H(g) = -g log g - (1 - g) log(1 - g), written with softplus to stay finite for large logits. (As
    # BCE(logit, g.detach()) its value is right but its gradient is g - g = 0: the term would do nothing.)
    entropy = (g * F.softplus(-gate_logits) + (1 - g) * F.softplus(gate_logits)).mean()
    loss = lm + lam * penalty + cfg["gate_z_weight"] * z + cfg["gate_entropy_weight"] * entropy
    return loss, {"lm": lm.item(), "penalty": penalty.item(), "mean_gate": mean_gate.item(), "z": z.item(),
                  "entropy": entropy.item()}


# -----------------------------------------------------------------------------
# The tuning loop

def tune_routers(cfg):
    """Router tuning for a pretrained model, every base weight frozen. cfg: default_config(...) or the script's.

    Phase 1: skip routers (SkipRouters.gates) trained with soft gates and _tuning_loss for max_iters steps.
    Then each unit's gate-logit quantiles on calibration text (what keep_ratio converts through). Phase 2 (with
    exit_layers and exit_iters > 0): the routers are frozen and each exit gate learns, by BCE, whether the state
    at its layer, through the final norm and LM head, already gives the routed model's final argmax (CALM's
    consistency target, learned: the gate sees only the state). Last, with target_speedup (or
    target_mean_layers), a bisection on the hard threshold until the layer-call ratio measured through the
    adapter on calibration text is within target_tol of the target. Everything lands in out_dir/routers.pt
    (atomic): router weights, layout, model name/path, quantiles and the threshold sample.py uses by default.
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
                          ("router_mlp_hidden", cfg["router_mlp_hidden"] >= 0, ">= 0 (0 = a linear gate)")]:
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
    try:
        units, exit_layers = skip_layout(L, cfg["router_pattern"], cfg["router_start"], cfg["router_stop"],
                                         cfg["router_group"], cfg["exit_layers"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    routers = SkipRouters(mc.hidden_size, units, exit_layers, cfg["router_mlp_hidden"]).to(device)
    block = cfg["block_size"]
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and block > max_pos:
        raise SystemExit(f"error: block_size={block} exceeds {name}'s context ({max_pos}): lower block_size.")
    if cfg["self_distill"]:
        train_ids, val_ids = self_distill_ids(model, tok, cfg["dataset"], cfg["self_distill"],
                                              cfg["self_distill_tokens"], cfg["seed"], cfg["batch_size"])
    else:
        train_ids, val_ids = corpus_ids(tok, cfg["dataset"])
    if max(int(train_ids.max()), int(val_ids.max())) >= mc.vocab_size:
        raise SystemExit(f"error: the tokenizer gives ids beyond the model's vocab_size={mc.vocab_size}.")
    B, accum = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    gen, calib_gen = torch.Generator().manual_seed(cfg["seed"]), torch.Generator().manual_seed(cfg["seed"] + 2)
    calib = text_windows(train_ids, block, cfg["calib_windows"], calib_gen)   # thresholds are set on these
    val = text_windows(val_ids, block, cfg["eval_iters"] * B)                 # held out: reported, never tuned on
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "routers.pt")
    if cfg["self_distill"]:                     # the answers as text, for another tuning run: --dataset=this file
        with open(os.path.join(out_dir, "self_distill.txt"), "w", encoding="utf-8") as f:
            f.write(tok.decode(train_ids.tolist() + val_ids.tolist()))
    if cfg["exit_head_layer"]:
        return tune_exit_head(cfg, model, train_ids, val, path)
    routed = routers.routed_layers()
    print(f"router tuning for {name} ({mc.model_type}, {L} layers, base frozen): {len(units)} skip gates over "
          f"{routed} routed layers (units {units}), exit gates at {exit_layers or 'none'}; "
          f"{sum(p.numel() for p in routers.parameters()):,} trainable parameters; "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens")
    # every unit at target_active_ratio would run this fraction of all layer calls
    print(f"target_active_ratio {cfg['target_active_ratio']} of routed units ~ a layer-call ratio of "
          f"{(L - routed + cfg['target_active_ratio'] * routed) / L:.3f}")

    def batches(windows, size=B):
        for i in range(0, len(windows), size):
            w = windows[i:i + size].to(device)
            yield w[:, :-1], w[:, 1:]

    @torch.no_grad()
    def evaluate(it):
        """Val loss of the full model (once) and with soft gates; hard-routed perplexity through the adapter."""
        routers.eval()
        soft = [F.cross_entropy(soft_forward(model, routers, X)[0].flatten(0, 1).float(), Y.flatten()).item()
                for X, Y in batches(val)]
        hard = eval_ppl(DepthAdapter(model, router="skip", skip_routers=routers, hard_threshold=0.5, exits=False),
                        val, B)
        routers.train()
        print(f"step {it}: val loss full depth {full_val:.4f}, soft gates {sum(soft) / len(soft):.4f} | hard "
              f"(gate > 0.5): val ppl {hard['ppl']:.3f} (full {math.exp(full_val):.3f}) at layer-call ratio "
              f"{hard['layer_ratio']:.3f}")
        return {"iter": it, "val_loss_soft": sum(soft) / len(soft), "val_ppl_hard_0.5": hard["ppl"],
                "layer_ratio_hard_0.5": hard["layer_ratio"]}

    def save(**extra):
        meta = {"model": name, "config": cfg, "hard_threshold": 0.5, "exit_threshold": cfg["exit_threshold"],
                "exits_trained": False, "full_val_loss": full_val, **state, **extra}
        save_skip_routers(path, routers, model, **meta)

    with torch.no_grad():
        full = [F.cross_entropy(soft_forward(model, None, X)[0].flatten(0, 1).float(), Y.flatten()).item()
                for X, Y in batches(val)]
    full_val, state = sum(full) / len(full), {}

    # ---- phase 1: skip routers, soft gates -----------------------------------------------------------------
    opt = torch.optim.AdamW(routers.gates.parameters(), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
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
            group["lr"] = lr_at(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["max_iters"])
        hard = it >= (1 - cfg["hard_gate_frac"]) * cfg["max_iters"]            # the last part: straight-through
        for _ in range(accum):
            X, Y = data.get_batch(train_ids, B, block, gen, device)
            logits, gate_logits, _ = soft_forward(model, routers, X, hard=hard)
            loss, parts = _tuning_loss(logits, Y, gate_logits, cfg, it, hard)
            (loss / accum).backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(routers.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % cfg["log_interval"] == 0:
            dt = (time.time() - t0) / cfg["log_interval"]
            t0 = time.time()
            print(f"iter {it + 1}: loss {loss.item():.4f} (lm {parts['lm']:.4f}, penalty {parts['penalty']:.4f}, "
                  f"entropy {parts['entropy']:.3f}), mean {'hard' if hard else 'soft'} gate "
                  f"{parts['mean_gate']:.3f} (target {cfg['target_active_ratio']}), lr {group['lr']:.2e}, "
                  f"{1000 * dt:.0f} ms/iter")
    routers.eval()
    routers.requires_grad_(False)

    # ---- gate quantiles on calibration text: what keep_ratio converts through ----------------------------------
    with torch.no_grad():
        q_logits = torch.cat([soft_forward(model, routers, X)[1].flatten(0, 1) for X, _ in batches(calib)])
    levels = torch.linspace(0, 1, 101, device=q_logits.device)
    state["gate_logit_quantiles"] = torch.quantile(q_logits.float(), levels, dim=0).T.contiguous().cpu()  # (U, 101)
    state["unit_mean_gate"] = torch.sigmoid(q_logits).mean(0).tolist()
    print("mean soft gate per unit on calibration text: "
          + ", ".join(f"{a}-{b - 1}: {g:.2f}" for (a, b), g in zip(units, state["unit_mean_gate"])))
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
                group["lr"] = lr_at(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["exit_iters"])
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

    # ---- target speedup: bisection on the hard threshold -------------------------------------------------------
    hard_threshold = 0.5
    target = (1 / cfg["target_speedup"] if cfg["target_speedup"] else cfg["target_mean_layers"] / L
              if cfg["target_mean_layers"] else None)
    if target is not None:
        def make(z):                                                          # z: the threshold as a logit
            return DepthAdapter(model, router="skip", skip_routers=routers, hard_threshold=_sigmoid(z),
                                exit_threshold=cfg["exit_threshold"], exits=exits_trained)
        z, found, reached = search_cutoff(make, -30.0, 30.0, target, calib, cfg["target_tol"], batch_size=B)
        hard_threshold = _sigmoid(z)
        held = eval_ppl(make(z), val, B)
        print(f"target layer-call ratio {target:.3f} (speedup {1 / target:.2f}x in layer calls): hard_threshold "
              f"{hard_threshold:.6g} gives {found['layer_ratio']:.3f} on calibration text"
              f"{'' if reached else ' (the closest reachable: not within target_tol)'}; held-out text: ratio "
              f"{held['layer_ratio']:.3f}, ppl {held['ppl']:.3f} vs full depth {math.exp(full_val):.3f} "
              f"({100 * (held['ppl'] / math.exp(full_val) - 1):+.1f}%)")
        state["target"] = {"layer_ratio": target, "calib_ratio": found["layer_ratio"], "reached": reached,
                           "val_ratio": held["layer_ratio"], "val_ppl": held["ppl"]}
    save(iter_num=cfg["max_iters"], hard_threshold=hard_threshold)
    print(f"saved {path}\n  python sample.py --routers {path} --prompt 'ROMEO:' --return_depth_trace")


# -----------------------------------------------------------------------------
# A speculative draft: an exit head trained by KL divergence to the final layer's distribution

@torch.no_grad()
def _states(model, layer, windows, batch_size):
    """The frozen base over windows (N, T): (the states entering `layer`, the final normed states), each
    (N * T, C). The head trains on these, computed once: its steps then never run the base."""
    h, final = [], []
    for i in range(0, len(windows), batch_size):
        out = model.model(windows[i:i + batch_size], output_hidden_states=True)
        h.append(out.hidden_states[layer].flatten(0, 1))                   # hidden_states[l]: layer l's input
        final.append(out.last_hidden_state.flatten(0, 1))                  # after the final norm
    return torch.cat(h), torch.cat(final)


def tune_exit_head(cfg, model, train_ids, val, path):
    """A draft for speculative decoding, base frozen: hf_wrap.ExitHead at exit_head_layer, trained to match the
    final layer's next-token distribution on the tuning text (KL(p_full || q_head) over the head's vocab, with p
    renormalized there: the head cannot propose what it lacks, and a draft covering p's mass on its vocab is the
    one that speculative sampling accepts most). The base runs once over exit_head_windows windows; the steps
    then train on those states, batch_size * block_size tokens each, drawn at random. Reports, on held-out text,
    how often the head's argmax is the full model's (greedy acceptance) and sum(min(p, q)) (acceptance when
    sampling at temperature 1). Writes path (hf_wrap.save_exit_head)."""
    layer, dev = cfg["exit_head_layer"], model.get_input_embeddings().weight.device
    L, V = model.config.num_hidden_layers, model.config.vocab_size
    counts = torch.bincount(torch.from_numpy(train_ids.astype("int64")), minlength=V)
    vocab = None
    if cfg["exit_head_vocab"]:                                               # the most frequent tokens of the text
        vocab = counts.argsort(descending=True)[:min(cfg["exit_head_vocab"], int((counts > 0).sum()))]
    try:
        head = hf_wrap.new_exit_head(model, layer, vocab, cfg["exit_head_rank"])
    except ValueError as e:
        raise SystemExit(f"error: exit_head_layer: {e}") from None
    W = model.get_output_embeddings().weight
    Wv = W if vocab is None else W[head.vocab].float()                       # (V', C) the head's rows, frozen
    n = min(cfg["exit_head_windows"], len(train_ids) // (cfg["block_size"] + 1))
    windows = text_windows(train_ids, cfg["block_size"], n)[:, :-1].to(dev)
    t0 = time.time()
    h, final = _states(model, layer, windows, cfg["batch_size"])
    vh, vfinal = _states(model, layer, val[:, :-1].to(dev), cfg["batch_size"])
    print(f"exit head at layer {layer} of {L} (rank {cfg['exit_head_rank']}, vocab {len(head.vocab):,} of {V:,}: "
          f"{counts[head.vocab].sum() / counts.sum():.1%} of the tuning text's tokens); {len(h):,} train / "
          f"{len(vh):,} held-out tokens, base states in {time.time() - t0:.0f} s")

    def kl(hs, fs):                                     # KL(p || q) over vocab, p renormalized there; (N,) each
        logp = F.log_softmax(F.linear(fs.to(Wv.dtype), Wv).float(), -1)
        logq = F.log_softmax(head(hs, Wv).float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1), logp, logq

    @torch.no_grad()
    def evaluate(it):
        agree = overlap = loss = 0.0
        for i in range(0, len(vh), 512):
            hs, fs = vh[i:i + 512], vfinal[i:i + 512]
            k, logp, logq = kl(hs, fs)
            target = F.linear(fs, W).argmax(-1)                               # the full model's greedy token
            agree += float((head.vocab[logq.argmax(-1)] == target).sum())
            overlap += float(torch.minimum(logp.exp(), logq.exp()).sum(-1).sum())
            loss += float(k.sum())
        result = {"iter": it, "kl": loss / len(vh), "greedy_agree": agree / len(vh), "overlap": overlap / len(vh)}
        print(f"step {it}: held-out KL {result['kl']:.4f}, argmax = the full model's {result['greedy_agree']:.1%}, "
              f"sum min(p, q) {result['overlap']:.1%}")
        return result

    opt = torch.optim.AdamW(head.parameters(), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                            weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = cfg["batch_size"] * cfg["block_size"]
    first, t0 = evaluate(0), time.time()
    for it in range(cfg["max_iters"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["max_iters"])
        idx = torch.randint(len(h), (rows,), generator=gen).to(dev)
        loss = kl(h[idx], final[idx])[0].mean()
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % cfg["log_interval"] == 0:
            print(f"iter {it + 1}: KL {loss.item():.4f}, {1000 * (time.time() - t0) / cfg['log_interval']:.0f} ms/iter")
            t0 = time.time()
    head.eval().requires_grad_(False)
    last = evaluate(cfg["max_iters"])
    hf_wrap.save_exit_head(path, head, model, model=cfg["hf"], config=cfg, untrained=first, last_eval=last)
    print(f"saved {path}\n  python sample.py --routers {path} --speculative=4")


# -----------------------------------------------------------------------------
# Quality at matched compute: perplexity, block influence, threshold search (bench.py --mode=ppl uses these)

def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@torch.no_grad()
def eval_ppl(adapter, windows, batch_size=8):
    """Teacher-forced perplexity of `windows` (N, T + 1) through adapter.prefill_logits (what generation computes),
    and the compute it took: layer_ratio = layer calls / (tokens * L), kv_ratio = K/V-only fills / (tokens * L)."""
    dev = adapter.embed.weight.device
    nll = calls = full = kv = n = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(dev)
        logits, st = adapter.prefill_logits(w[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        calls, full, kv, n = calls + st["layer_calls"], full + st["layer_calls_full"], \
            kv + st["kv_only_layer_calls"], n + st["tokens"]
    L = len(adapter.layers)                           # layers_per_depth counts layers, so full = n * L
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "layer_ratio": calls / full,
            "mean_layers": calls / n, "kv_ratio": kv / (n * L)}


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


def search_cutoff(make, lo, hi, target, windows, tol=0.005, iters=40, batch_size=8):
    """Bisection on a router's threshold until the layer-call ratio it gives on `windows` is within tol of
    `target`. make(v) -> a DepthAdapter; the ratio must be monotone in v (either direction). -> (v, eval_ppl
    dict at v, reached). A target out of reach gives the closer end and reached=False; a ratio that jumps over
    the target (few tokens, or a discrete router) gives the closest value seen."""
    r_lo, r_hi = (eval_ppl(make(v), windows, batch_size) for v in (lo, hi))
    best = min(((abs(r["layer_ratio"] - target), v, r) for v, r in ((lo, r_lo), (hi, r_hi))), key=lambda t: t[0])
    if (r_lo["layer_ratio"] - target) * (r_hi["layer_ratio"] - target) > 0:
        return best[1], best[2], best[0] <= tol
    side_lo = r_lo["layer_ratio"] > target
    for _ in range(iters):
        if best[0] <= tol:
            break
        mid = (lo + hi) / 2
        r = eval_ppl(make(mid), windows, batch_size)
        best = min(best, (abs(r["layer_ratio"] - target), mid, r), key=lambda t: t[0])
        if (r["layer_ratio"] > target) == side_lo:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[0] <= tol


if __name__ == "__main__":
    tune_routers(configurator.configure(globals()))

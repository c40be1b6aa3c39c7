"""
Train a Mixture-of-Recursions model (or its vanilla / recursive baselines).

  python train.py config/mor_tiny.py                  # one CPU or GPU
  python train.py config/mor_tiny.py --max_iters=200  # any key can be overridden
  torchrun --standalone --nproc_per_node=2 train.py config/mor_tiny.py   # DDP (nccl on GPU, gloo on CPU)
  python train.py --help                              # every key, its default, what it does

The data (built-in Shakespeare, or dataset='path/to/file.txt') is prepared on first use.
"""
import os
import random
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from configurator import (append_csv, autocast_context, autodetect_device, configure, gpu_peak_flops, load_checkpoint,
                          lr_at, plot_depth_history, require, require_at_least, save_checkpoint, set_threads)
from diffusion import masked_diffusion_loss
from model import MoR, MoRConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 250             # evaluate (and save a checkpoint) every this many iterations
log_interval = 10               # print and log to out_dir/train_log.csv every this many iterations
eval_iters = 50                 # batches per split in an evaluation
eval_only = False               # evaluate once, then exit
init_from = "scratch"           # scratch | resume (continue the run in out_dir); router tuning for HF models: tune.py
seed = 1337
# data
dataset = "shakespeare"         # the built-in corpus, or a path to your own .txt file
tokenizer = "char"              # char | bpe (tiktoken cl100k, remapped to the ids the corpus uses)
data_dir = "data"               # where prepared token files live
batch_size = 32                 # sequences per micro-batch
block_size = 256                # context length
gradient_accumulation_steps = 1
objective = "ar"                # ar: next token, causal | diffusion: masked diffusion, bidirectional (diffusion.py)
# model: see MoRConfig in model.py for what each knob does
n_layer = 6
n_head = 6
n_kv_head = 0                   # 0 = n_head
n_embd = 384
intermediate_size = 0           # 0 = 8/3 * n_embd
dropout = 0.0
tie_embeddings = True
rope_theta = 10000.0
n_recursion = 1                 # R
sharing = "none"                # none | cycle | sequence | middle_cycle | middle_sequence
router = "none"                 # none | expert_choice | token_choice
kv_mode = "recursion"           # recursion | share_first
capacity = ()                   # expert-choice keep fraction per step, () = (R - r) / R
router_arch = "linear"          # linear | mlp
router_fn = "sigmoid"           # sigmoid | tanh
router_alpha = 0.1              # gate g = alpha * sigmoid(logit / router_temperature)
router_temperature = 1.0
router_aux = "loss"             # loss (BCE on the router) | router (separate aux router decides at inference)
router_aux_weight = 0.001
router_z_weight = 0.0
balancing = "loss"              # token-choice: loss | loss_free | none
router_balance_weight = 0.1
balance_bias_rate = 1e-3
router_entropy_weight = 0.0
target_depth = 0.0              # token-choice: target mean depth (0 = off)
target_depth_weight = 0.0
# optimizer: AdamW, warmup then cosine or warmup-stable-decay
learning_rate = 1e-3
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # 0 = off
lr_schedule = "cosine"          # cosine | wsd (warmup-stable-decay)
warmup_iters = 100
lr_decay_iters = 0              # cosine: reach min_lr here (0 = max_iters)
decay_frac = 0.2                # wsd: the last fraction of max_iters decays linearly to min_lr
min_lr = 1e-4
# router logging
log_depth_hist_every = 100      # iterations between depth-histogram rows (0 = off)
depth_hist_path = "depth_hist.csv"   # relative to out_dir
plot = ""                       # at the end, draw depth_hist.csv (depth share by iteration) to this PNG
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"                  # auto (bf16 on CUDA, else float32) | float32 | bfloat16 | float16
compile = False                 # torch.compile the model
backend = "nccl"                # DDP backend on GPUs (CPU always uses gloo)
deterministic = False           # seed every RNG and use torch's deterministic kernels: a rerun gives the same losses
threads = 0                     # CPU threads (0: torch's default); 1 is often much faster on a busy shared machine
# -----------------------------------------------------------------------------
config = configure(globals())
require(learning_rate > 0, f"learning_rate must be > 0, got {learning_rate}: e.g. --learning_rate=1e-3")
require(0 <= min_lr <= learning_rate, f"min_lr must be between 0 and learning_rate ({learning_rate}), got {min_lr}: "
                                      f"set --min_lr lower (0 decays all the way)")
require_at_least(config, batch_size=1, block_size=1, gradient_accumulation_steps=1, eval_iters=1, eval_interval=1,
                 log_interval=1, max_iters=0, warmup_iters=0, log_depth_hist_every=0, grad_clip=0)
require_at_least(config, weight_decay=0, lr_decay_iters=0)
require(0 <= beta1 < 1 and 0 <= beta2 < 1, f"beta1={beta1}, beta2={beta2}: AdamW's decay rates lie in [0, 1) "
                                           "(e.g. --beta1=0.9 --beta2=0.95)")
require(0 <= decay_frac <= 1, f"decay_frac={decay_frac}: the fraction of max_iters that decays (wsd), in [0, 1]")
require(lr_schedule in ("cosine", "wsd"), f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
require(objective in ("ar", "diffusion"), f"objective must be 'ar' or 'diffusion', got {objective!r}")
require(objective == "ar" or router == "none", "objective='diffusion' trains with router='none' (its adaptivity is "
                                               "in the refinement passes per token, diffusion.py)")
require(not os.path.exists(out_dir) or os.path.isdir(out_dir),
        f"out_dir '{out_dir}' is a file, but out_dir must be a folder (new or existing): choose another path")
_hist_dir = os.path.dirname(os.path.join(out_dir, depth_hist_path))    # out_dir itself is made below
require(os.path.abspath(_hist_dir) == os.path.abspath(out_dir) or os.path.isdir(_hist_dir),
        f"depth_hist_path={depth_hist_path!r}: its folder {_hist_dir!r} does not exist; give a file name (written "
        "in out_dir) or a path in an existing folder")
model_keys = {f.name for f in fields(MoRConfig)}
set_threads(threads)

# DDP: torchrun sets RANK; one process per device
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = autodetect_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend if device.startswith("cuda") else "gloo")
else:
    rank, local_rank, world = 0, 0, 1
    device = autodetect_device(device)
master = rank == 0
device_type = device.split(":")[0]
ctx, dtype = autocast_context(device_type, dtype)
torch.manual_seed(seed + rank)
if deterministic:   # the batches come from seeded generators already; this pins the rest
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.use_deterministic_algorithms(True)   # an op with no deterministic kernel raises instead of drifting
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # what cuBLAS needs for that (read at its first use)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
tokens_per_iter = gradient_accumulation_steps * world * batch_size * block_size
if master:
    print(f"device {device}, dtype {dtype}, {world} process(es), {tokens_per_iter:,} tokens per iteration")

# data: prepared once (rank 0 first, the others then read it), read by memmap
if master:
    prepared = data.prepare(dataset, tokenizer, data_dir)
if ddp:
    dist.barrier()
if not master:
    prepared = data.prepare(dataset, tokenizer, data_dir)
meta = data.load_meta(prepared)
splits = {s: data.load_split(prepared, s) for s in ("train", "val")}
train_gen = torch.Generator().manual_seed(seed + rank)   # training batches: saved and restored on resume
vocab_size = data.Tokenizer.from_meta(meta["tokenizer"]).vocab_size


def get_batch(split, gen):
    return data.get_batch(splits[split], batch_size, block_size, gen, device)


# model: from scratch, or resumed from out_dir/ckpt.pt
model_args = {k: config[k] for k in model_keys if k in config}
model_args.update(vocab_size=vocab_size, capacity=tuple(capacity))
mask_token = vocab_size if objective == "diffusion" else -1     # diffusion: one extra id, the last, is [MASK]
if objective == "diffusion":
    model_args.update(vocab_size=vocab_size + 1, mask_token=mask_token, bidirectional=True)
try:
    model_config = MoRConfig(**model_args)   # validates, and fills derived values (n_kv_head, intermediate_size)
except ValueError as e:
    raise SystemExit(f"error: bad model config: {e}")
iter_num, best_val_loss, ckpt = 0, float("inf"), None
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":
    ckpt = load_checkpoint(ckpt_path, device)
    saved, wanted = ckpt["model_args"], asdict(model_config)
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"error: {ckpt_path} does not match this config ({lines}). "
                         f"Resume with the config it was trained with, or use a new out_dir.")
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
elif init_from != "scratch":
    raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got {init_from!r}"
                     + (": router tuning for a pretrained model is python tune.py --hf=<name or path>"
                        if init_from.startswith("hf:") else ""))
if master:
    os.makedirs(out_dir, exist_ok=True)   # after every check: a rejected config leaves no empty out_dir behind
model = MoR(model_config)
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.to(device)
raw_model = model
plan = model.plan
if master:
    print(f"{model.num_params() / 1e6:.2f}M unique non-embedding parameters, {plan.n_unique} unique layers, "
          f"{plan.full_depth_layers} layer applications at full depth"
          + (f" ({plan.n_dropped} dropped to fit R={plan.n_recursion})" if plan.n_dropped else ""))

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))   # only fp16 needs loss scaling
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if ckpt is not None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    train_gen.set_state(ckpt["rng"]["train_gen"][rank % len(ckpt["rng"]["train_gen"])])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if master:
        print(f"resumed from {ckpt_path} at iteration {iter_num}")
ckpt = None  # free memory
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


@torch.no_grad()
def evaluate():
    """Mean loss on fixed batches of each split, by the causal routing rule (what generation does); expert-choice
    also reports its training rule's (top-k) val loss and how often the two agree at each step."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1000)   # the same batches at every evaluation
        rules = ("causal", "topk") if router == "expert_choice" and split == "val" else ("causal",)
        for rule in rules:
            losses, depths, agree = [], [], {}
            for _ in range(eval_iters):
                X, Y = get_batch(split, gen)
                with ctx:
                    loss = masked_diffusion_loss(raw_model, X, mask_token, gen) if objective == "diffusion" \
                        else raw_model(X, Y, rule=rule)[1]     # diffusion: the NLL bound at seeded masking rates
                losses.append(loss.item())
                depths.append(raw_model.last_depth.flatten())
                for k, v in raw_model.last_route.stats.items():
                    if k.startswith("agree"):
                        agree.setdefault(k, []).append(float(v))
            key = split if rule == "causal" else f"{split}_topk"
            out[key] = sum(losses) / len(losses)
            out[key + "_depth"] = raw_model.depth_stats(torch.cat(depths))
            out.update({k: sum(v) / len(v) for k, v in agree.items()})
    model.train()
    return out


def save(gen_states):
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_args": asdict(model_config), "iter_num": iter_num, "best_val_loss": best_val_loss,
            "config": config, "tokenizer": meta["tokenizer"],
            "rng": {"torch": torch.get_rng_state(), "train_gen": gen_states,
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}}
    save_checkpoint(ckpt, ckpt_path)


def all_gen_states():
    """Every rank's batch-sampler state: each rank resumes its own stream."""
    state = train_gen.get_state()
    if not ddp:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def log_depths(it, kind, summary):
    """Depth histogram rows: iteration, which tokens (train / val_causal), depth, count."""
    if master and log_depth_hist_every:
        for d, c in enumerate(summary["depth_hist"]):
            append_csv(os.path.join(out_dir, depth_hist_path),
                       {"iter": it, "kind": kind, "depth": d, "tokens": c, "fraction": c / max(1, summary["tokens"])})


# -----------------------------------------------------------------------------
# the training loop
peak = gpu_peak_flops(device)
dense_fpt = raw_model.dense_flops_per_token(block_size)   # vanilla of the same depth and shape
if master and peak is None and device_type == "cuda":
    print(f"note: {torch.cuda.get_device_name()} is not in configurator.py's peak-FLOPs table: MFU is not reported")
t0, iters_timed = time.time(), 0
run_start, written = t0, "no checkpoint written" + (" (eval_only)" if eval_only else "")
while True:
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters, lr_schedule, lr_decay_iters, decay_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr

    eval_now = iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only   # always before the end
    gen_states = all_gen_states() if eval_now else None   # a collective: every rank takes part
    if eval_now and master:
        ev = evaluate()
        line = f"step {iter_num}: train {ev['train']:.4f}, val {ev['val']:.4f}"
        if router != "none":
            dv = ev["val_depth"]
            line += f" | val mean depth {dv['mean_depth']:.2f}, compute saved {dv['compute_saved_pct']:.1f}%"
        if router == "expert_choice":
            agree = ", ".join(f"step {k[5:]} {ev[k]:.3f}" for k in sorted(ev) if k.startswith("agree"))
            line += f" | top-k val {ev['val_topk']:.4f} | causal rule agrees with top-k: {agree}"
        print(line)
        append_csv(os.path.join(out_dir, "eval_log.csv"),
                   {"iter": iter_num, "train_loss": ev["train"], "val_loss": ev["val"],
                    "val_loss_topk": ev.get("val_topk", ""), "val_mean_depth": ev["val_depth"]["mean_depth"],
                    **{k: ev[k] for k in sorted(ev) if k.startswith("agree")}})
        log_depths(iter_num, "val_causal", ev["val_depth"])
        best_val_loss = min(best_val_loss, ev["val"])
        if iter_num > 0 and not eval_only:
            save(gen_states)
            print(f"saved {ckpt_path}")
            written = f"wrote {ckpt_path}"
    if eval_only or iter_num >= max_iters:
        break
    if eval_now:
        t0, iters_timed = time.time(), 0   # time training only, not evaluation

    # forward/backward over gradient_accumulation_steps micro-batches
    flops = 0
    for micro in range(gradient_accumulation_steps):
        X, Y = get_batch("train", train_gen)
        if ddp:  # sync gradients on the last micro-batch only
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with ctx:
            loss = masked_diffusion_loss(model, X, mask_token) if objective == "diffusion" else model(X, Y)[1]
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        flops += 3 * raw_model.last_flops   # forward + backward ~ 3x forward, counted on the tokens that ran
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    route = raw_model.last_route
    if router == "token_choice" and balancing == "loss_free":   # bias_i += u * sign(mean - load_i)
        load = route.stats["load"].to(device)
        if ddp:
            dist.all_reduce(load)
            load /= world
        raw_model.router.update_bias(load)

    iter_num += 1
    iters_timed += 1
    if iter_num % log_interval == 0 and master:
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = (time.time() - t0) / iters_timed
        flops = float(flops)
        mfu = flops / dt / peak if peak else None   # per process, against this GPU's peak
        lossf = loss.item() * gradient_accumulation_steps
        row = {"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_iter": 1000 * dt,
               "tokens_per_s": tokens_per_iter / dt, "mfu": mfu if mfu is not None else "",
               "flops_per_token": flops / 3 / (batch_size * block_size * gradient_accumulation_steps),
               "vanilla_flops_per_token": dense_fpt}
        row.update({f"loss_{k}": float(v.detach()) for k, (w, v) in route.losses.items()})
        row.update({k: float(v) for k, v in route.stats.items() if k.startswith("frac")})
        append_csv(os.path.join(out_dir, "train_log.csv"), row)
        extra = ""
        if router != "none":
            fracs = " ".join(f"{row[k]:.2f}" for k in row if k.startswith("frac"))
            losses = " ".join(f"{k[5:]} {row[k]:.4f}" for k in row if k.startswith("loss_"))
            extra = f", selected per step {fracs}, {losses}"
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
              f"GFLOPs/token {row['flops_per_token'] / 1e9:.4f} (vanilla {dense_fpt / 1e9:.4f}){extra}")
        t0, iters_timed = time.time(), 0
    if log_depth_hist_every and iter_num % log_depth_hist_every == 0 and router != "none":
        log_depths(iter_num, "train", raw_model.depth_stats())

if plot and master:
    plot_depth_history(os.path.join(out_dir, depth_hist_path), plot)
if master:   # the closing line: the last evaluation's val loss and depth, and what the run left behind
    print(f"done at iteration {iter_num} in {time.time() - run_start:.1f} s (training and evaluation): val loss "
          f"{ev['val']:.4f}, compute saved {ev['val_depth']['compute_saved_pct']:.1f}% of layer calls, {written}")
if ddp:
    dist.destroy_process_group()

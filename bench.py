"""
Benchmarks, always MoR against vanilla in the same run, same shape, same machine.

  python bench.py                     # training + decode; GPU: GPT-2-124M-like, bf16, compiled. CPU: tiny
  python bench.py --mode=train        # ms/iter, tokens/s, MFU, executed FLOPs/token, peak memory
  python bench.py --mode=decode       # batched greedy decoding: per-step, continuous depth-wise batching, graphed
  python bench.py --mode=gpu --report_csv=gpu.csv   # the one GPU script: decode, compiled training, HF adapter
  python bench.py --mode=hf           # the HF adapter: generate vs --no_skip vs ~50% depth; a verify pass in steps
  python bench.py --mode=spec --hf=smollm2-135m --routers=out-spec-draft/routers.pt   # speculative decoding, real model
  python bench.py --mode=ppl --hf=out-dense-cpu/hf --routers=out-hf-router-tune/routers.pt   # quality table
  python bench.py --mode=diffusion    # masked diffusion: adaptive refinement vs fixed passes (trained models)

Models are built with random weights: speed does not depend on what the weights say, except through routing.
Untrained routers route arbitrarily, so decode forces depths 1..R equally likely by default (depth_dist='forced',
the split expert-choice's default capacities give); depth_dist='router' uses the model's own, and says so.
"""
import contextlib
import functools
import math
import os
import time

import torch
import torch.nn.functional as F

import data
import hf_wrap
import speculative as spec
from configurator import (append_csv, autocast_context, autodetect_device, configure, gpu_peak_flops, load_checkpoint,
                          pyplot, save_figure, set_threads)
from model import ContinuousBatching, MoR, MoRConfig
from router import DepthFirstRouter

# -----------------------------------------------------------------------------
mode = "all"                    # all | train | decode | hf | spec, ppl, diffusion (not in all: trained models) | gpu
size = "auto"                   # auto (gpt2 on a GPU, tiny elsewhere) | gpt2 | tiny
# the shape, batch and lengths: 0 = the size's default (SIZES below; n_layer 12 divides by R = 2, 3 and 4)
n_layer = 0
n_embd = 0
n_head = 0
vocab_size = 0
block_size = 0
batch_size = 0                  # training micro-batch
sharing = "cycle"               # cycle keeps every variant at exactly n_layer layer applications
train_variants = ""             # ';'-separated prefixes of TRAIN_VARIANTS names ("" = all), e.g. "vanilla;MoR-3 token"
train_iters = 20                # timed training steps per variant (after warmup_iters)
warmup_iters = 5
decode_batches = ()             # batch sizes to decode at; () = 1, 2, 4, ... up to the largest that fits
prompt_len = 0
new_tokens = 0                  # tokens generated per sequence
depth_dist = "forced"           # forced (depths 1..R equally likely) | router (the model's own, untrained)
device = "auto"
dtype = "auto"                  # auto: bf16 on CUDA, float32 elsewhere (--hf: the weights, on a CPU too)
threads = 0                     # CPU threads (0: torch's default); the timings depend on it (the table names it)
compile = True                  # torch.compile the training step on CUDA (ignored on CPU)
cudnn_sdpa = True               # False: keep PyTorch's SDPA off its cuDNN backend (it plans per new shape; see README)
profile = False                 # write a torch.profiler trace (bench_trace_<variant>.json) per training variant
report_csv = ""                 # write every row of every table here
plot = ""                       # PNG of decode tokens/s against batch size (needs matplotlib)
seed = 1337
repeats = 3                     # every timing is the median of this many runs, the models interleaved
graphs = "auto"                 # also decode compiled (CUDA graphs on a GPU): auto (on a GPU) | on | off; --mode=spec:
                                # with a static drop plan at 80% of the layers (compiling timed apart)
hf_shapes = ()                  # --mode=hf: HF_SHAPES names (() = the two big ones on a GPU, tiny elsewhere)
# --mode=ppl: the quality table (tune.py's evaluation helpers)
hf = ""                         # the model: a local folder (e.g. sample.py --export_hf output) or a hub name
routers = ""                    # router or drafter files (tune.py's routers.pt), comma-separated: a row each
speculative = 4                 # --mode=spec: drafts per cycle of the speculative rows, fixed and adaptive
lookup = 3                      # ... and the n-gram of their prompt-lookup rows (0 = none)
decoders = ""                   # --mode=spec: comma-separated parts of the row names to run ("" = all), e.g.
                                # "no_skip,static drop,routed" (transformers generate always runs: the reference)
bias = None                     # --mode=spec: the trained --routers files' logit bias (None: each file's own)
threshold = None                # deprecated: the old name of --bias
dataset = "pydoc,shakespeare"   # comma-separated: thresholds matched on the first's train split, perplexity on
                                # every one's held-out split (data.py)
ppl_depths = (0.9, 0.8, 0.7)    # layer-call ratios to match, as fractions of the layers
ppl_windows = 128               # held-out windows of block_size tokens for the perplexities
calib_windows = 32              # train-split windows: block influence and every threshold search use these
target_tol = 0.005              # threshold searches stop within this of the target layer-call ratio
ppl_stop_tails = (2,)           # expert_choice's oracle stop row at each of these tail sizes (OracleStop; () = none):
                                # on a CPU ~2.5 min a depth at tail 2, ~6 at tail 8 (SmolLM2-135M)
ppl_calm = True                 # CALM's training-free exit rows too (~7 of a CPU run's ~35 min; False: leave them out)
# --mode=diffusion: adaptive refinement against fixed passes (diffusion.py)
diffusion_dir = "out-diffusion-tiny"   # the model (python train.py config/diffusion_tiny.py)
judge_dir = "out-vanilla-tiny"  # the autoregressive judge of generations (python train.py config/vanilla_tiny.py)
mask_rates = (0.15, 0.3, 0.5)   # infilling: the fraction of each validation passage masked
infill_windows = 64             # validation passages (block_size tokens) per rate, refined as one batch
fixed_passes = (1, 2, 4, 8)     # the fixed baseline's pass counts (the claim is checked against fixed 4)
gen_samples = 32                # generations, each after gen_prompt tokens of validation text, as one batch
gen_prompt = 16
gen_tokens = 48                 # new tokens per generation (prompt + new <= both models' block_size)
gen_block = 16                  # generations are refined in blocks of this many positions, left to right
gen_temperature = 0.8           # generations sample at this temperature (infilling commits the most likely token)
# -----------------------------------------------------------------------------
if __name__ == "__main__":     # an import (tests) reads no command line and runs nothing
    config = configure(globals())
    set_threads(threads)
    torch.manual_seed(seed)
device = autodetect_device(device)
device_type = device.split(":")[0]
hf_dtype = None if dtype == "auto" else dtype        # --hf's weights: --dtype as given, on a CPU too (load_real)
ctx, dtype = autocast_context(device_type, "auto" if hf and hf_dtype in ("float32", "bfloat16", "float16") else dtype)
if size == "auto":
    size = "gpt2" if device_type == "cuda" else "tiny"
SIZES = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, block_size=1024, batch_size=12,
                      prompt_len=128, new_tokens=128),
         "tiny": dict(n_layer=12, n_embd=128, n_head=4, vocab_size=256, block_size=128, batch_size=8,
                      prompt_len=16, new_tokens=32)}
if size not in SIZES:
    raise SystemExit(f"error: size must be auto, gpt2 or tiny, got {size!r}")
if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in decode_batches):
    raise SystemExit(f"error: decode_batches={decode_batches!r}: batch sizes are ints >= 1, e.g. "
                     "--decode_batches=1,4 (or () for the defaults)")
def _ints(v, lo):
    return isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v)


def _fractions(v):
    return isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) and 0 < x <= 1 for x in v)


for key, ok, what in [             # each setting's range, before anything is built or loaded
        ("repeats", _ints([repeats], 1), "an int >= 1"), ("train_iters", _ints([train_iters], 1), "an int >= 1"),
        ("warmup_iters", _ints([warmup_iters], 0), "an int >= 0"),
        *[(k, _ints([globals()[k]], 0), "an int >= 0 (0: the size's value)") for k in SIZES["tiny"]],
        ("depth_dist", depth_dist in ("forced", "router"), "forced or router"),
        ("graphs", graphs in ("auto", "on", "off"), "auto, on or off"),
        ("ppl_depths", _fractions(ppl_depths), "layer-call ratios in (0, 1], e.g. --ppl_depths=0.9,0.8"),
        ("ppl_windows", _ints([ppl_windows], 1), "an int >= 1"),
        ("ppl_calm", isinstance(ppl_calm, bool), "True or False"),
        ("ppl_stop_tails", isinstance(ppl_stop_tails, (tuple, list)) and all(type(t) is int and t >= 0 for t in
                                                                             ppl_stop_tails),
         "a tuple of tail sizes >= 0, e.g. (2, 8), or () for none"),
        ("calib_windows", _ints([calib_windows], 1), "an int >= 1"),
        ("target_tol", isinstance(target_tol, float) and 0 < target_tol < 1, "in (0, 1), e.g. 0.005"),
        ("speculative", _ints([speculative], 1) and speculative <= 64, "an int in 1..64 (4 is a good start)"),
        ("lookup", _ints([lookup], 0), "an int >= 0 (0: no prompt-lookup rows)"),
        ("mask_rates", _fractions(mask_rates), "fractions in (0, 1]"),
        ("fixed_passes", _ints(fixed_passes, 1), "ints >= 1"),
        *[(k, _ints([globals()[k]], 1), "an int >= 1") for k in ("infill_windows", "gen_samples", "gen_prompt",
                                                                 "gen_tokens", "gen_block")],
        ("gen_temperature", isinstance(gen_temperature, (int, float)) and gen_temperature >= 0, ">= 0")]:
    if not ok:
        raise SystemExit(f"error: {key}={globals()[key]!r}: must be {what}.")
for k, v in SIZES[size].items():
    if not globals()[k]:
        globals()[k] = v
use_compile = compile and device_type == "cuda"
use_graphs = graphs == "on" or (graphs == "auto" and device_type == "cuda")
if not cudnn_sdpa:
    torch.backends.cuda.enable_cudnn_sdp(False)   # flash / memory-efficient / math attention only
rows = []   # every result row, for --report_csv


class ForcedDepthRouter(DepthFirstRouter):
    """Each token's depth is a fixed hash of (row, position), drawn from `probs` (of depths 1..R): throughput at
    a chosen depth distribution. No gates. Passed to MoR(cfg, router=...)."""
    gated = False

    def __init__(self, probs):
        super().__init__()
        self.R = len(probs)
        self.register_buffer("cum", torch.tensor(probs, dtype=torch.float64).cumsum(0), persistent=False)

    def assign(self, h, candidates, state):
        b, pos = candidates.row, candidates.pos
        u = ((pos * 2654435761 + b * 40503 + 12345) % 2**32).double() / 2**32   # uniform-ish in [0, 1)
        depth = torch.searchsorted(self.cum.to(u.device), u, right=True).clamp(max=self.R - 1) + 1
        return depth, None


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def build(R=1, router="none", kv_mode="recursion", forced=False, **kw):
    """A random model of the bench's shape. forced: depths 1..R equally likely (ForcedDepthRouter)."""
    cfg = MoRConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    n_recursion=R, sharing="none" if R == 1 else sharing, router=router, kv_mode=kv_mode, **kw)
    return MoR(cfg, router=ForcedDepthRouter([1.0 / R] * R) if forced else None).to(device)


# every column of every table, for the CSV (a new table adds its own)
CSV_COLS = ["table", "variant", "model", "shape", "decode", "decoder", "routing", "batch", "ms/iter", "tokens/s",
            "spread %", "ms/step", "ms/token", "MFU %", "GFLOPs/token", "FLOPs vs vanilla", "time vs vanilla",
            "mean depth", "layers/token", "rows/block call", "vs vanilla", "vs generate", "ideal", "of ideal %",
            "peak MiB", "unique params (M)", "target depth", "target ratio", "method", "setting", "calib ratio",
            "ratio", "kv-only %", "ppl", "vs full %", "task", "accuracy %", "nll", "gen ppl", "passes",
            "mean recursions", "token-layer ops", "compute saved %", "wall ms", "time saved %", "easy/medium/hard %",
            "same as generate", "K", "acceptance %", "tokens/cycle", "draft ms/cycle", "verify ms/cycle", "text",
            "head checks %", "agree %", "same tokens %", "layer calls %", "tokens per row", "ms per pass",
            "vs one step", "gap closed", "GB/token", "limit tok/s", "of limit %", "first call s"]


def emit(table, row):
    """Keep a result row; with --report_csv, append it to the CSV at once (a run cut short keeps it)."""
    row = {"table": table, **row}
    rows.append(row)
    if report_csv:
        append_csv(report_csv, row, CSV_COLS)


def report(name, title, table, cols):
    """print_table, then emit every row under table `name`."""
    print_table(title, table, cols)
    for r in table:
        emit(name, r)


def speed(B, n, med, lo, hi):
    """tokens/s of B rows of n new tokens in med seconds, and the timings' spread."""
    return {"tokens/s": B * n / med, "spread %": 100 * (hi - lo) / med}


def print_table(title, table, cols):
    print(f"\n{title}")
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in table)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in table:
        print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def fmt(v):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


# -----------------------------------------------------------------------------
# Training throughput: forward + backward + AdamW step, same shape for every variant

TRAIN_VARIANTS = [
    ("vanilla", dict()),
    ("recursive R=3", dict(R=3)),
    ("MoR-3 expert-choice, recursion-wise", dict(R=3, router="expert_choice")),
    ("MoR-3 expert-choice, share-first", dict(R=3, router="expert_choice", kv_mode="share_first")),
    ("MoR-3 token-choice, recursion-wise", dict(R=3, router="token_choice")),
    ("MoR-3 token-choice, share-first", dict(R=3, router="token_choice", kv_mode="share_first")),
]


def bench_train():
    peak = gpu_peak_flops(device)
    table = []
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    chosen = [p.strip() for p in train_variants.split(";") if p.strip()]
    variants = [(n, kw) for n, kw in TRAIN_VARIANTS if not chosen or any(n.startswith(p) for p in chosen)]
    if not variants or variants[0][0] != "vanilla":
        raise SystemExit(f"error: train_variants={train_variants!r} must select vanilla (every ratio is to it) and "
                         f"prefixes of: {', '.join(n for n, _ in TRAIN_VARIANTS)}")
    for name, kw in variants:
        model = build(**kw).train()
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
        step_model = torch.compile(model) if use_compile else model

        def step():
            with ctx:
                _, loss = step_model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup_iters):
            step()
        sync()
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
            dt = timed(lambda: [step() for _ in range(train_iters)])[1] / train_iters
        if profile:
            path = f"bench_trace_{name.split(',')[0].replace(' ', '_').replace('=', '')}.json"
            prof.export_chrome_trace(path)
            print(f"wrote {path}")
        tokens = batch_size * block_size
        flops = 3 * float(model.last_flops)            # executed: forward + backward ~ 3x forward
        depth = model.depth_stats()
        table.append({"variant": name, "ms/iter": 1000 * dt, "tokens/s": tokens / dt,
                      "MFU %": 100 * flops / dt / peak if peak else None,
                      "GFLOPs/token": flops / 3 / tokens / 1e9, "mean depth": depth["mean_depth"],
                      "peak MiB": torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None,
                      "unique params (M)": model.num_params() / 1e6})
        del model, opt, step_model
    base = table[0]
    for r in table:
        r["time vs vanilla"] = r["ms/iter"] / base["ms/iter"]
        r["FLOPs vs vanilla"] = r["GFLOPs/token"] / base["GFLOPs/token"]
    report("train", f"training: {n_layer} layers, d={n_embd}, batch {batch_size} x {block_size} tokens, {dtype}, "
           f"compile={use_compile}, {train_iters} timed steps on {device_name()}", table,
           ["variant", "ms/iter", "tokens/s", "MFU %", "GFLOPs/token", "FLOPs vs vanilla", "time vs vanilla",
            "mean depth", "peak MiB", "unique params (M)"])


# -----------------------------------------------------------------------------
# Decode throughput: batched greedy decoding with the KV cache

def decode_models(Rs=(2, 3, 4), token_choice=True):
    """vanilla, MoR-R expert-choice for R in Rs, and MoR-3 token-choice, eval mode."""
    forced = depth_dist == "forced"
    out = [("vanilla", build(), None)]
    for R in Rs:
        out.append((f"MoR-{R} expert-choice", build(R=R, router="expert_choice", forced=forced), R))
    if token_choice:
        out.append(("MoR-3 token-choice", build(R=3, router="token_choice", forced=forced), 3))
    for _, m, _ in out:
        m.eval()
    return out


def timed(fn):
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def interleaved(runs):
    """Time every fn of `runs` [(key, fn)] `repeats` times, round-robin, so that drift on a shared machine hits
    all alike, after an untimed warm-up call of each. -> {key: (last result, median s, min s, max s)}."""
    out = {}
    for key, fn in runs:
        with ctx:
            fn()
    times = {key: [] for key, _ in runs}
    for _ in range(repeats):
        for key, fn in runs:
            with ctx:
                out[key], dt = timed(fn)
            times[key].append(dt)
    return {key: (out[key], *spread(times[key])) for key, _ in runs}


def spread(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2], ts[0], ts[-1]


DECODE_COLS = ["model", "decode", "routing", "batch", "tokens/s", "spread %", "ms/step", "mean depth",
               "rows/block call", "vs vanilla", "ideal", "of ideal %"]


def bench_decode(batches=None, models=None):
    """Per-step decoding (generate), continuous depth-wise batching (eager) and, with graphs, the continuous
    engine compiled whole; vanilla runs graphed in the engine too (R = 1), like with like. 'ideal' is the ratio
    to vanilla that the layer applications at the measured depths allow."""
    models = models or decode_models()
    batches = batches or list(decode_batches) or [2**i for i in range(0, 10 if device_type == "cuda" else 4)]
    table = []
    for B in batches:
        prompt = torch.randint(0, vocab_size, (B, prompt_len), device=device)
        runs, meta = [], {}
        for name, m, R in models:
            kinds = ["per-step"] + (["continuous"] if R else []) + (["graphed"] if use_graphs else [])
            for how in kinds:
                if how == "per-step":
                    fn = (lambda m=m: m.generate(prompt, new_tokens, temperature=0, return_depths=True))
                else:
                    fn = (lambda m=m, c=how == "graphed": ContinuousBatching(m, prompt, new_tokens, temperature=0,
                                                                             compile=c).run())
                runs.append(((name, how), fn))
                meta[(name, how)] = (m, R)
        try:
            timings = interleaved(runs)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {B} does not fit: stopping here")
            break
        new_rows = []
        for (name, how), ((out, depths, *extra), med, lo, hi) in timings.items():
            m, R = meta[(name, how)]
            d = depths[:, prompt_len:-1] if how == "per-step" else depths   # the same decoded tokens
            lpd = m.plan.layers_per_depth()
            layers = float(torch.tensor(lpd, dtype=torch.float)[d.flatten().cpu()].mean()) if R else lpd[-1]
            base = timings[("vanilla", "graphed" if how == "graphed" else "per-step")][1]
            row = {"model": name, "decode": how, "batch": B, "routing": "-" if not R else depth_dist,
                   **speed(B, new_tokens, med, lo, hi), "ms/step": 1000 * med / new_tokens,
                   "mean depth": float(d.float().mean()) if R else 1.0,
                   "rows/block call": extra[0]["live_rows_per_tick"] if extra else None,
                   "vs vanilla": base / med, "ideal": lpd[-1] / layers}
            row["of ideal %"] = 100 * row["vs vanilla"] / row["ideal"]
            new_rows.append(row)
            emit("decode", row)
        table += new_rows
        # each batch size's rows as soon as they exist: a run cut short still reports them
        print_table(f"decode, batch {B} (median of {repeats}, interleaved):", new_rows, DECODE_COLS)
    print_table(f"decode: greedy, prompt {prompt_len} + {new_tokens} new tokens, {dtype}, on {device_name()}; "
                f"median of {repeats} interleaved runs; routing '{depth_dist}'"
                + (" (forced: depths 1..R equally likely, hashed per token)"
                   if depth_dist == "forced" else " (untrained routers)"), table, DECODE_COLS)
    if depth_dist == "router":
        for name, m, R in models:
            if R:
                print(f"note: {name} has untrained routers: its depths above are arbitrary, not learned")
    if plot:
        draw(table)


def draw(table):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["model"], r["decode"]) for r in table}):
        pts = [(r["batch"], r["tokens/s"]) for r in table if (r["model"], r["decode"]) == key]
        ax.plot(*zip(*pts), marker="o", label=" ".join(k for k in key if k != "-"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"decode throughput on {device_name()}")
    ax.legend(fontsize=7)
    save_figure(fig, plot)


# -----------------------------------------------------------------------------
# One GPU script: every speed measurement that needs the accelerator, in one short run

def bench_gpu():
    """Decode at batch 1 and a large one, compiled training, the HF adapter at the TinyLlama shape: about 8
    minutes on an H100; on a CPU at the tiny size, a smoke test."""
    global train_variants, hf_shapes
    big = 256 if device_type == "cuda" else 4
    bench_decode(batches=list(decode_batches) or [1, big], models=decode_models(Rs=(3, 4), token_choice=False))
    train_variants = train_variants or "vanilla;MoR-3 expert-choice, recursion-wise;MoR-3 token-choice, recursion-wise"
    bench_train()
    hf_shapes = hf_shapes or (("TinyLlama-1.1B",) if device_type == "cuda" else ("tiny",))
    bench_hf()


# -----------------------------------------------------------------------------
# The HF adapter: plain transformers generate vs the adapter at full and ~50% depth

HF_SHAPES = {   # random weights: with the fixed router, speed does not depend on them
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024),
}


def bench_hf():
    if hf:
        raise SystemExit(f"error: --mode=hf measures the adapter at random model shapes, without --hf; speculative "
                         f"decoding on a real model is --mode=spec: python bench.py --mode=spec --hf={hf}"
                         + (f" --routers={routers}" if routers else ""))
    from transformers import LlamaConfig, LlamaForCausalLM
    shapes = list(hf_shapes) or (["TinyLlama-1.1B", "Llama-3-8B"] if device_type == "cuda" else ["tiny"])
    if set(shapes) - set(HF_SHAPES):
        raise SystemExit(f"error: hf_shapes={list(hf_shapes)}: choose from {', '.join(HF_SHAPES)}")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    table = []
    for shape in shapes:
        cfg = LlamaConfig(**HF_SHAPES[shape], max_position_embeddings=4096)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch_dtype).eval()
        data.cpu_linears(model)                                # load_hf's CPU kernels
        L = cfg.num_hidden_layers
        half = hf_wrap.DepthAdapter(model, router="fixed", R=L - 2, base_layers=2, depth=L // 2 - 2)
        full = hf_wrap.DepthAdapter(model, router="none", R=L - 2, base_layers=2)
        if use_graphs:
            with torch.device(device):
                compiled = LlamaForCausalLM(cfg).to(torch_dtype).eval()
            compiled.load_state_dict(model.state_dict())
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
        for B in (1, 8):
            ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)
            plain = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            runs = [("transformers generate", lambda: model.generate(ids, **plain), L)]
            if use_graphs:   # the anchor a GPU user would pick: a static cache and a compiled forward (CUDA graphs)
                runs.append(("generate, static cache + compile",
                             lambda: compiled.generate(ids, cache_implementation="static", **plain), L))
            for c in (False, True) if use_graphs else (False,):   # graphed: DepthAdapter._static_step compiled
                how = ", graphed" if c else ""
                runs += [(f"adapter --no_skip{how}", lambda c=c: full.generate(ids, max_new_tokens=new_tokens,
                                                                               compile=c), L),
                         (f"adapter fixed {L // 2}/{L} layers{how}",
                          lambda c=c: half.generate(ids, max_new_tokens=new_tokens, compile=c), L // 2)]
            timings = interleaved([(name, fn) for name, fn, _ in runs])
            base = timings["transformers generate"][1]
            for name, fn, layers in runs:
                _, med, lo, hi = timings[name]
                table.append({"shape": shape, "batch": B, "decoder": name, "layers/token": layers,
                              **speed(B, new_tokens, med, lo, hi), "ms/token": 1000 * med / new_tokens,
                              "vs generate": base / med})
        bench_verify(model, (1, 8), prompt_len, f"at the {shape} shape, {dtype}", shape=shape)
        del model
    report("hf", f"HF adapter decode: greedy, prompt {prompt_len} + {new_tokens} new tokens, {dtype}, on "
           f"{device_name()} (prefill included; median of {repeats}, interleaved)", table,
           ["shape", "batch", "decoder", "layers/token", "tokens/s", "spread %", "ms/token", "vs generate"])


# -----------------------------------------------------------------------------
# Speculative decoding (--mode=spec): what a verify pass costs, and the drafts against transformers on a real model

def bench_verify(lm, batches, prompt, where, **tag):
    """What speculative decoding rests on (verify_cost): a verify pass over w tokens, in decode steps (eager, and
    with --graphs compiled: the pass speculative.generate(compile=True) runs)."""
    costs = [dict(**tag, **r) for B in batches for c in (False, True) if c <= use_graphs
             for r in verify_cost(lm, B, prompt, interleaved=interleaved, compiled=c)]
    report("verify", f"The verify pass {where}, {device_name()}: one full pass over w new tokens per row after "
           f"{prompt}", costs, ["batch", "compiled", "tokens per row", "ms per pass", "vs one step"])


@torch.no_grad()
def verify_cost(model, B, prompt_len, widths=(1, 2, 3, 5, 9), n=5, interleaved=interleaved, compiled=False):
    """Speculative decoding's premise, measured: a full-depth pass over w new tokens per row (verifying w - 1
    drafts) against one decode step (w = 1), batch B after prompt_len tokens; each timed call runs n passes.
    compiled: the compiled step over the chunk (DepthAdapter.decode_step), after one warm-up pass per width."""
    full, dev = hf_wrap.DepthAdapter(model, no_skip=True), model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (B, prompt_len + max(widths)), device=dev)
    cache, ids, pos, _ = full.new_cache(ids[:, :prompt_len], None, max(widths), compile=compiled)
    full.forward_chunk(cache, ids, pos, 0)
    new = torch.randint(0, model.config.vocab_size, (B, max(widths)), device=dev)
    steps = pos[:, -1:] + 1 + torch.arange(max(widths), device=dev)
    one_pass = full.decode_step if compiled else lambda *a: full.forward_chunk(*a, all_logits=True)

    def passes(w, n=n):                 # the same cache slots each time: the cost is measured, not the text
        for _ in range(n):
            one_pass(cache, new[:, :w], steps[:, :w], prompt_len)
        hf_wrap.now(dev)
    for w in widths if compiled else ():
        passes(w, 1)                    # the compile, outside the timing
    timings = interleaved([(w, lambda w=w: passes(w)) for w in widths])
    one = timings[widths[0]][1]
    return [{"batch": B, "compiled": "yes" if compiled else "no", "tokens per row": w,
             "ms per pass": 1000 * timings[w][1] / n, "vs one step": timings[w][1] / one} for w in widths]


def _on_mkl(model, fn):
    data.cpu_linears(model, "mkl")
    try:
        return fn()
    finally:
        data.cpu_linears(model, "onednn")


SPEC_PROMPTS = ("Explain mixture of recursions simply.", "Write a short story about a lighthouse keeper.",
                "How does a refrigerator keep food cold?", "Describe the water cycle for a ten-year-old.")


def spec_drafts(model, router_paths, bias):
    """(name, adapter, drafter) for each router file (trained routers at `bias`, an exit head, a drafter), then
    the untrained exit at layer l (the model's own head at the first exit head's layer, else 2L/3). -> (drafts, l)."""
    L, drafts = model.config.num_hidden_layers, []
    for path in router_paths:
        try:                                          # e.g. a file tuned for another model: the clear error
            blob = hf_wrap.read_router_file(path)
            if blob["format"] == hf_wrap.DRAFTER_FILE_FORMAT:
                drafts.append((f"drafter ({path})", hf_wrap.DepthAdapter(model), spec.load_drafter(path, model)[0]))
            else:
                drafts.append((f"{blob['router']} ({path})", hf_wrap.DepthAdapter(
                    model, router=blob["router"], router_path=path,
                    bias=None if blob["router"] == "exit_head" else bias), None))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    exit_layer = next((ad.exit_head.layer for _, ad, _ in drafts if ad.exit_head is not None), 2 * L // 3)
    drafts.append((f"untrained exit at layer {exit_layer}",
                   hf_wrap.DepthAdapter(model, router="fixed", R=L - 1, base_layers=1, depth=exit_layer - 1), None))
    return drafts, exit_layer


def spec_runs(model, ids, mask, drafts, exit_layer, n, K, eos, pad, lookup):
    """compare()'s decoders at one batch, [(name, fn -> (ids, stats or None))]: transformers' (generate, its
    early-exit assistant and prompt lookup), the adapter at full depth, a static drop plan and each draft's routed
    decode (eager, then compiled with graphs), speculative decoding (fixed and adaptive K), our prompt lookup;
    --decoders' only."""
    gen, B = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad), ids.shape[0]
    full = hf_wrap.DepthAdapter(model, no_skip=True)
    drafted = lambda ad, **kw: spec.generate(ad, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos,
                                             K=K, **kw)
    runs = [("transformers generate", lambda: (model.generate(ids, **gen), None))]
    if any("forward" in m.__dict__ for m in model.modules()):   # load_hf's oneDNN linears: what they gain
        runs.append(("transformers generate, MKL linears", lambda: _on_mkl(model, lambda: (
            model.generate(ids, **gen), None))))
    if B == 1:
        runs.append((f"transformers assistant_early_exit={exit_layer}",
                     lambda: (model.generate(ids, assistant_early_exit=exit_layer, **gen), None)))
        if lookup:                                     # transformers' own prompt lookup (batch 1 only)
            runs.append((f"transformers prompt_lookup_num_tokens={K}", lambda: (model.generate(
                ids, prompt_lookup_num_tokens=K, max_matching_ngram_size=lookup, **gen), None)))
    plans = [("adapter --no_skip", full, eos)] + ([(*drop_plan(model, ids), None)] if use_graphs else [])
    plans += [(f"routed decode, {name}", ad, None) for name, ad, _ in drafts   # the router alone, unverified: all
              if ad.router in hf_wrap.ROUTER_KINDS + ("drop",)]                 # n tokens
    for (name, ad, stop), c in ((p, c) for p in plans for c in (False, True) if use_graphs or not c):
        runs.append((name + (", compiled" if c else ""), lambda ad=ad, stop=stop, c=c: ad.generate(
            ids, attention_mask=mask, max_new_tokens=n, eos_token_id=stop, compile=c)))
    for name, ad, dr in drafts:
        for adapt in (False, True):
            runs.append((f"speculative, {name}{', adaptive K' if adapt else ''}",
                         lambda ad=ad, dr=dr, adapt=adapt: drafted(ad, drafter=dr, adapt_k=adapt)))
        if use_graphs:                                 # the draft's steps and the verify pass compiled
            runs.append((f"speculative, {name}, adaptive K, compiled",
                         lambda ad=ad, dr=dr: drafted(ad, drafter=dr, adapt_k=True, compile=True)))
    if lookup:                                         # drafts from the text itself, alone and with a head
        heads = [d for d in drafts if d[2] is not None] + [d for d in drafts if d[1].exit_head is not None]
        for c in (False, True) if use_graphs else (False,):
            runs.append((f"speculative, prompt lookup ({lookup}-gram){', compiled' if c else ''}",
                         lambda c=c: drafted(full, lookup=lookup, compile=c)))
            for name, ad, dr in heads[:1]:             # the drafter, else the first exit head
                runs.append((f"speculative, prompt lookup, else {name}, adaptive K{', compiled' if c else ''}",
                             lambda ad=ad, dr=dr, c=c: drafted(ad, drafter=dr, adapt_k=True, lookup=lookup,
                                                               compile=c)))
    keep = [d for d in decoders.split(",") if d]
    return [r for r in runs if r[0] == "transformers generate" or not keep or any(d in r[0] for d in keep)]


def drop_plan(model, ids, share=0.8):
    """ShortGPT's static plan at `share` of the layer calls: drop the layers of lowest block influence on the
    prompts ids. -> (its row name, its DepthAdapter)."""
    from tune import block_influence
    L = model.config.num_hidden_layers
    drop = static_drop_layers(block_influence(model, ids), round((1 - share) * L))
    return f"static drop {L - len(drop)}/{L} layers", hf_wrap.DepthAdapter(model, router="drop", drop_layers=drop)


@torch.no_grad()
def read_bandwidth(model, n=5):
    """The machine's read bandwidth in GB/s, each the median of n: a sum over a 1 GB float32 tensor, and a
    matrix-vector pass over the model's 2-D weights (what a decode step reads). -> (sum's, matvec's)."""
    dev = model.get_input_embeddings().weight.device
    big, weights = torch.ones(2**28, device=dev), [p for p in model.parameters() if p.dim() == 2]
    vectors = [torch.ones(w.shape[1], device=dev, dtype=w.dtype) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    gb_s = lambda fn, size: size / 1e9 / sorted(timed(fn)[1] for _ in range(n))[n // 2]
    return (gb_s(big.sum, big.numel() * 4),
            gb_s(lambda: [w @ v for w, v in zip(weights, vectors)], nbytes))


def weight_bytes(model):
    """What one token reads: a decoder layer's weights, and the final norm and LM head's, in bytes."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    return size(model.model.layers[0]), size(model.get_output_embeddings()) + size(model.model.norm)


def bandwidth_share(row, st, L, layer_bytes, head_bytes, gb_s):
    """A decode row's bandwidth limit: the weight bytes it read per token (the layer calls it made, its K/V-only
    fill by weight share, the LM head; transformers: all L layers) at gb_s, and the share of it reached. Speculative
    rows are left out: a verify pass reads the weights once for several tokens."""
    if st is None and not row["decoder"].startswith("transformers generate"):
        return {}
    if st is not None and "acceptance_rate" in st:
        return {}
    layers = L if st is None else (st["layer_calls"] + st["kv_only_layer_calls"] * st["kv_share"]) / st["tokens"]
    limit = gb_s * 1e9 / (layers * layer_bytes + head_bytes)                  # tokens/s at the bandwidth
    return {"GB/token": (layers * layer_bytes + head_bytes) / 1e9, "limit tok/s": limit,
            "of limit %": 100 * row["tokens/s"] / limit}


def spec_row(B, name, timing, ids, ref, base):
    """One decoder's row: speed and tokens against generate's, and a draft's acceptance."""
    (out, st), med, lo, hi = timing
    row = {"batch": B, "decoder": name, **speed(B, out.shape[1] - ids.shape[1], med, lo, hi),
           "vs generate": (out.shape[1] - ids.shape[1]) / med / ((ref.shape[1] - ids.shape[1]) / base),
           "same as generate": "yes" if torch.equal(out, ref) else "NO"}
    if out.shape == ref.shape:                 # routed decode: the share of new tokens that match generate's
        row["same tokens %"] = 100 * float((out == ref)[:, ids.shape[1]:].float().mean())
    if st is not None and "compute_saved_pct" in st and "acceptance_rate" not in st:
        row["layer calls %"] = 100 - st["compute_saved_pct"]
    if st is not None and "acceptance_rate" in st:
        row.update({"K": f"{st['speculative']}" + (f" -> {st['k_final']} (mean {st['k_mean']:.1f})"
                                                   if st["adapt_k"] else ""),
                    "acceptance %": 100 * st["acceptance_rate"], "tokens/cycle": st["tokens_per_cycle"],
                    "draft ms/cycle": 1000 * st["draft_s"] / st["cycles"],
                    "verify ms/cycle": 1000 * st["verify_s"] / st["cycles"]})
    return row


def compare(model, tok, router_paths, bias, batches, n, K, interleaved, emit=lambda row: None, lookup=3):
    """Greedy decoding of chat prompts (SPEC_PROMPTS), n new tokens, every decoder of spec_runs interleaved, per
    batch size. -> rows (each also passed to emit)."""
    dev, table = model.get_input_embeddings().weight.device, []
    drafts, exit_layer = spec_drafts(model, router_paths, bias)
    bandwidth, sizes = read_bandwidth(model), weight_bytes(model)
    print(f"read bandwidth: {bandwidth[0]:.1f} GB/s (sum over 1 GB), {bandwidth[1]:.1f} GB/s (a matrix-vector pass "
          f"over the weights); the limit below uses {max(bandwidth):.1f}")
    for B in batches:
        chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 if getattr(tok, "chat_template", None) else t for t in (SPEC_PROMPTS * B)[:B]]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)     # left padding (load_hf)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        runs = spec_runs(model, ids, mask, drafts, exit_layer, n, K, tok.eos_token_id, tok.pad_token_id, lookup)
        first = {name: timed(fn)[1] for name, fn in runs if name.endswith("compiled")}   # compiling, then a run
        timings = interleaved(runs)
        ref, base = timings["transformers generate"][0][0], timings["transformers generate"][1]
        for name, _ in runs:
            table.append(spec_row(B, name, timings[name], ids, ref, base))
            table[-1].update(bandwidth_share(table[-1], timings[name][0][1], model.config.num_hidden_layers, *sizes,
                                             max(bandwidth)))
            if name in first:
                table[-1]["first call s"] = first[name]
            emit(table[-1])
    return table


def router_files():
    """--routers' files, each ready to route with (hf_wrap.unready; else SystemExit, as sample.py refuses it), read
    before the model loads; without it, tune.py's default file of every trained kind for --hf (data.default_routers)
    that is ready, each named (the others skipped, with why)."""
    given = [p for p in routers.split(",") if p]
    found = []
    for path in given or filter(os.path.isfile, (data.default_routers(hf, kind) for kind in hf_wrap.ROUTER_KINDS)):
        try:
            problem = hf_wrap.unready(hf_wrap.read_router_file(path), path)
        except ValueError as e:
            problem = str(e)
        if given and problem:
            raise SystemExit(f"error: {problem}")
        if not given:
            print(f"note: skipping {problem}" if problem else f"routers: {path} (tune.py's for {hf}; --routers=<files>"
                  " picks others)")
        found += [] if problem else [path]
    return found


def load_real():
    """--hf's model and tokenizer on the bench's device, in --dtype (auto: bf16 on CUDA, else float32)."""
    return data.load_hf(hf, device=device, dtype=hf_dtype or ("bfloat16" if device_type == "cuda" else "float32"))


def bench_speculative():
    """--mode=spec --hf=<model>: the verify pass's cost, then self-speculative decoding against transformers
    (compare) with each --routers file and the untrained exit as drafts; every row must give generate's tokens."""
    global bias
    if not hf:
        raise SystemExit("error: --mode=spec needs --hf=<model> (smollm2-135m is built in), and --routers=<draft "
                         "files> for trained drafts")
    if threshold is not None:                     # the old name (one release)
        print(f"note: --threshold is deprecated here: it is the trained routers' logit bias, --bias={threshold}")
        bias = threshold if bias is None else bias
    paths = router_files()
    model, tok = load_real()
    batches = list(decode_batches) or [1]
    bench_verify(model, batches, 64, f"on {hf}", model=hf)
    table = compare(model, tok, paths, bias, batches,
                    new_tokens, speculative, interleaved, lambda r: emit("hf", dict(model=hf, **r)), lookup)
    print_table(f"Self-speculative decoding on {hf}: greedy, chat prompts, {new_tokens} new tokens, on "
                f"{device_name()} (prefill included; median of {repeats}, interleaved; 'same' = generate's "
                "tokens)", table,
                ["batch", "decoder", "tokens/s", "spread %", "vs generate", "same as generate", "same tokens %",
                 "layer calls %", "GB/token", "limit tok/s", "of limit %", "first call s", "K", "acceptance %",
                 "tokens/cycle", "draft ms/cycle", "verify ms/cycle"])


# -----------------------------------------------------------------------------
# Quality at matched compute (--mode=ppl): does adaptive depth beat ShortGPT's static layer dropping? Through
# tune.py's eval_ppl, block_influence and search_cutoff

def static_drop_layers(influence, n):
    """The n layers with the lowest block influence, never layer 0 (ShortGPT's static layer removal)."""
    order = sorted(range(1, len(influence)), key=lambda l: influence[l])
    return sorted(order[:n])


@torch.no_grad()
def exit_statistics(model, windows, batch_size=8):
    """For CALM's training-free exits, once on the full model: every token's top-1 probability and entropy
    (nats) through the final norm and LM head, at each layer 1..L-1. -> {"confidence": (N, L - 1), "entropy":
    (N, L - 1)}; column l - 1: the state entering layer l."""
    head, norm, conf, ent = model.get_output_embeddings(), model.model.norm, [], []
    for i in range(0, len(windows), batch_size):
        hs = model.model(windows[i:i + batch_size, :-1].to(head.weight.device), output_hidden_states=True).hidden_states
        c, e = [], []
        for h in hs[1:-1]:                                                   # hidden_states[l] enters layer l
            logp = head(norm(h)).float().log_softmax(-1).flatten(0, 1)
            c.append(logp.max(-1).values.exp())
            e.append(-(logp.exp() * logp).sum(-1))
        conf.append(torch.stack(c, 1).cpu())
        ent.append(torch.stack(e, 1).cpu())
    return {"confidence": torch.cat(conf), "entropy": torch.cat(ent)}


def exit_ratio(stats, kind, threshold):
    """The layer-call ratio of exit `kind` at `threshold`, each token exiting at the first layer that passes
    (stats: exit_statistics) -> {"layer_ratio": ...}, for search_cutoff."""
    s = stats[kind]                                                           # (N, L - 1)
    ok = s >= threshold if kind == "confidence" else s <= threshold
    L = s.shape[1] + 1
    layers = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((len(s),), L))   # layers run
    return {"layer_ratio": float(layers.float().mean()) / L}


class OracleSkip:
    """What pure skipping could reach with a perfect signal, the line each router is measured against. It runs
    every layer, so it sees each token's true update f(h) = layer(h) - h, and keeps it only where the relative
    update ||f(h)|| / ||h|| >= threshold, one threshold over all layers; any other token keeps h, and wrote its K/V
    from h (the adapter's rule: the hooked layer computed every token's K/V from its input). mlp_only: attention
    always runs, and the rule keeps or drops the MLP's update (h is then the state entering the MLP).

    It is optimistic: no router sees f(h) before it runs the layer. It is not optimal: the largest relative update
    is not always the one the prediction needs, and a stand-in or another correction can do better than keeping h.

    HF's own forward, each layer's (or MLP's) output edited by a forward hook. prefill_logits is DepthAdapter's,
    for tune.eval_ppl, and counts the work with the adapter's weight shares."""

    def __init__(self, model, threshold, mlp_only=False):
        full = hf_wrap.DepthAdapter(model)            # its modules, and the weight shares it counts work by
        self.model, self.threshold, self.mlp_only = model, threshold, mlp_only
        self.embed, self.layers = full.embed, full.layers
        self.attn_share, self.kv_share = full.attn_share, full.kv_share

    def _keep(self, h, f, kept):
        """(B, T) bool: whose update f to the state h is large enough; appended to kept. The first token always
        runs: it is every later token's attention sink (its state carries the massive activations), and a router
        knows its position without seeing f(h)."""
        keep = f.float().norm(dim=-1) >= self.threshold * h.float().norm(dim=-1)
        kept.append(keep.index_fill(1, torch.zeros(1, dtype=torch.long, device=keep.device), True))
        return kept[-1][..., None]

    def _hooks(self, kept):
        if not self.mlp_only:                           # the layer's output y: y where kept, else its input h
            def edit(layer, args, kwargs, y):
                h = args[0] if args else kwargs["hidden_states"]
                return torch.where(self._keep(h, y - h, kept), y, h)
            return [layer.register_forward_hook(edit, with_kwargs=True) for layer in self.layers]
        state = {}                                      # the MLP's update m: kept, or 0 (the layer adds it to h)
        hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda norm, args: state.update(h=args[0]))
                 for layer in self.layers]
        edit = lambda mlp, args, m: torch.where(self._keep(state["h"], m, kept), m, torch.zeros_like(m))
        return hooks + [layer.mlp.register_forward_hook(edit) for layer in self.layers]

    @torch.no_grad()
    def prefill_logits(self, input_ids):
        """input_ids (B, T) unpadded -> (logits (B, T, V) float32, stats as DepthAdapter.prefill_logits's)."""
        kept, L = [], len(self.layers)
        hooks = self._hooks(kept)
        try:
            logits = self.model(input_ids.to(self.embed.weight.device), use_cache=False).logits.float()
        finally:
            for hook in hooks:
                hook.remove()
        n, ran = input_ids.numel(), float(torch.stack(kept).sum())        # token-layers whose update was kept
        calls = self.attn_share * n * L + (1 - self.attn_share) * ran if self.mlp_only else ran
        return logits, {"layer_calls": calls, "tokens": n, "kv_only_layer_calls": 0 if self.mlp_only else n * L - ran,
                        "kv_share": self.kv_share, "head_checks": 0, "head_share": 0.0}


class OracleStop(OracleSkip):
    """What expert_choice with tail_layers could reach with a perfect signal: each token stops at the first group
    whose stopped prediction -- the state entering the group, through the tail layers, the final norm and the LM
    head -- is within KL `threshold` of full depth's (the first token never stops: it is the attention sink). It
    computes each group's stopped prediction with the whole sequence (the sink too) stopped there: a signal no
    router has, so it is optimistic, and not optimal (the KL is an all-stopped sequence's, not the mixed one then
    evaluated). The perplexity and the work are those of the adapter's rule on HF's forward: a stopped token keeps
    its state through the groups left and writes its K/V from it, and every token runs the tail."""

    def __init__(self, model, threshold, tail_layers, R=7, base_layers=2):
        super().__init__(model, threshold)
        L = len(self.layers)
        self.units, self.tail = hf_wrap.group_layout(L, R, base_layers, tail_layers), L - tail_layers
        self.group_of = {l: g for g, (a, b) in enumerate(self.units) for l in range(a, b)}
        self._kl = {}

    def at(self, threshold):
        """This oracle at another threshold (the stops' KLs, computed once per batch, are kept)."""
        self.threshold = threshold
        return self

    @torch.no_grad()
    def _stop_kl(self, ids):
        """(B, T, groups): KL(full depth || stopped at group g) per token, kept per batch of ids."""
        from tune import _causal_mask
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes())
        if key in self._kl:
            return self._kl[key]
        out = self.model(ids, output_hidden_states=True, use_cache=False)
        full, inner, (B, T) = F.log_softmax(out.logits.float(), -1), self.model.model, ids.shape
        p, pos, kl = full.exp(), torch.arange(T, device=ids.device)[None].expand(B, T), []
        for a, _ in self.units:
            x = out.hidden_states[a]                      # the state entering the group
            rope = inner.rotary_emb(x, pos)
            for l in range(self.tail, len(self.layers)):
                mask = _causal_mask(T, hf_wrap.layer_window(self.model.config, l), x)
                x = self.layers[l](x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            stopped = F.log_softmax(self.model.get_output_embeddings()(inner.norm(x)).float(), -1)
            kl.append((p * (full - stopped)).sum(-1).clamp_min(0))     # >= 0 (float32 sums can dip below)
        self._kl[key] = torch.stack(kl, -1)
        return self._kl[key]

    def _depths(self, ids):
        """(B, T) long: the groups each token runs, by the rule above."""
        close = self._stop_kl(ids) < self.threshold
        close[:, 0] = False                               # the sink runs every group
        G = len(self.units)
        return torch.where(close.any(-1), close.float().argmax(-1), G)   # the first close group, else all

    @torch.no_grad()
    def prefill_logits(self, input_ids):
        """input_ids (B, T) unpadded -> (logits (B, T, V) float32, stats as DepthAdapter.prefill_logits's)."""
        ids = input_ids.to(self.embed.weight.device)
        depth = self._depths(ids)

        def edit(layer, args, kwargs, y, g):              # group g's layer: a token stopped before keeps h
            h = args[0] if args else kwargs["hidden_states"]
            return torch.where((depth > g)[..., None], y, h)
        hooks = [self.layers[l].register_forward_hook(functools.partial(edit, g=g), with_kwargs=True)
                 for l, g in self.group_of.items()]
        try:
            logits = self.model(ids, use_cache=False).logits.float()
        finally:
            for hook in hooks:
                hook.remove()
        n, L = ids.numel(), len(self.layers)
        sizes = torch.tensor([0] + [b - a for a, b in self.units], device=ids.device).cumsum(0)
        calls = float((L - sizes[-1]) * n + sizes[depth].sum())     # the layers outside the groups, + groups run
        return logits, {"layer_calls": calls, "tokens": n, "kv_only_layer_calls": n * L - calls,
                        "kv_share": self.kv_share, "head_checks": 0, "head_share": 0.0}


STATIC_ROW, ORACLE_ROW = "static drop (ShortGPT)", "oracle skip (sees f(h))"


def gap_closed(table, r):
    """How far row r goes from the static drop toward the oracle at its text and target depth: (static - ppl) /
    (static - oracle), perplexities of the rows STATIC_ROW and ORACLE_ROW in `table` (None until both exist).
    0 is static's, 1 the oracle's; above 1 beats the oracle (a stand-in can)."""
    at = {x["method"]: x["ppl"] for x in table if (x["text"], x["target depth"]) == (r["text"], r["target depth"])}
    static, oracle = at.get(STATIC_ROW), at.get(ORACLE_ROW)
    return None if static is None or oracle is None or static == oracle else (static - r["ppl"]) / (static - oracle)


def quality_table(model, tok, trained, names, depths, T, batch_size, calib_windows, ppl_windows, seed, target_tol,
                  emit=lambda row: None, calm=True, stop_tails=()):
    """--mode=ppl's rows. For each target depth f: drop n = round((1 - f) * L) layers (static_drop_layers), and
    match the oracles (OracleSkip, whole layers and MLPs only), CALM's exits and each trained router of `trained`
    ([(FrozenRouters, file dict)]) to that layer-call ratio by search_cutoff on names[0]'s train split; then
    perplexity, agreement with full depth, work and gap_closed on every dataset's held-out split. emit(row) as each
    row exists; calm=False leaves CALM's rows out; stop_tails: an OracleStop row for each of these tail sizes (7
    groups after 2 base layers, as tune.py's expert_choice; fewer of both where the model has fewer layers). ->
    (rows, calib)."""
    from hf_wrap import DepthAdapter
    from tune import block_influence, eval_ppl, search_cutoff
    L = model.config.num_hidden_layers
    train_ids, _ = data.corpus_ids(tok, names[0])
    calib = data.text_windows(train_ids, T, calib_windows, torch.Generator().manual_seed(seed + 2))
    held = {d: data.text_windows(data.corpus_ids(tok, d)[1], T, ppl_windows) for d in names}
    bs, t_start = batch_size, time.time()

    def progress(what):
        print(f"[{time.time() - t_start:6.0f} s] {what}", flush=True)

    influence = block_influence(model, calib, bs)
    try:
        base = {t: max(1, min(2, L - 1 - t)) for t in stop_tails}        # fewer where the model is small
        stops = {t: OracleStop(model, 0.0, t, max(1, min(7, L - base[t] - t)), base[t]) for t in stop_tails}
    except ValueError as e:
        raise SystemExit(f"error: ppl_stop_tails={tuple(stop_tails)}: {e}") from None
    progress("block influence per layer (1 - cos(in, out), calibration text): "
             + " ".join(f"{l}:{b:.3f}" for l, b in enumerate(influence)))
    full = {d: eval_ppl(DepthAdapter(model), held[d], bs, keep_argmax=True) for d in names}
    table = [{"text": d, "target depth": "100%", "method": "full depth", "setting": "-", "ratio": 1.0,
              "kv-only %": 0.0, "head checks %": 0.0, "ppl": full[d]["ppl"], "vs full %": 0.0, "agree %": 100.0}
             for d in names]
    for r in table:
        emit(r)
    # CALM's exits: on exit_statistics a threshold's layer-call ratio is a lookup (exited tokens change later
    # ones only through their K/V, so the real ratio, measured below, lands close)
    if calm:
        stats = exit_statistics(model, calib, bs)
        progress("exit statistics at every layer on calibration text")

    def row(depth, method, setting, ad):
        for d in names:
            got = eval_ppl(ad, held[d], bs, reference=full[d]["argmax"])
            r = {"text": d, "target depth": f"{100 * depth:.0f}%", "method": method, "setting": setting,
                 "ratio": got["layer_ratio"], "kv-only %": 100 * got["kv_ratio"],
                 "head checks %": 100 * got["head_ratio"], "ppl": got["ppl"],
                 "vs full %": 100 * (got["ppl"] / full[d]["ppl"] - 1), "agree %": 100 * got["agree"]}
            table.append(dict(r, **{"gap closed": gap_closed(table, r)}))
            emit(table[-1])
        progress(f"{100 * depth:.0f}%: {method} ({setting}): ppl " + ", ".join(
            f"{r['text']} {r['ppl']:.2f} at ratio {r['ratio']:.3f}" for r in table[-len(names):]))

    for depth in depths:
        n_drop = min(L - 1, max(1, round((1 - depth) * L)))
        target = (L - n_drop) / L                      # the static row's exact ratio: everyone matches it
        drop = static_drop_layers(influence, n_drop)
        row(depth, STATIC_ROW, f"layers {drop}", DepthAdapter(model, router="drop", drop_layers=drop))
        # the line a router is measured against: pure skipping with a perfect signal (OracleSkip: optimistic)
        for method, mlp_only in ((ORACLE_ROW, False), ("oracle skip, MLPs only", True)):
            make = lambda v: OracleSkip(model, v, mlp_only)
            v, _, ok = search_cutoff(lambda v: eval_ppl(make(v), calib, bs), 0.0, 4.0, target, target_tol)
            row(depth, method, f"||f(h)|| / ||h|| >= {v:.4g}" + ("" if ok else " (target missed)"), make(v))
        for tail, stop in stops.items():               # the same for early stopping (expert_choice)
            v, _, ok = search_cutoff(lambda v: eval_ppl(stop.at(v), calib, bs), 0.0, 30.0, target, target_tol)
            row(depth, f"oracle stop, expert_choice + tail {tail}", f"KL < {v:.4g}" + ("" if ok else
                                                                                       " (target missed)"), stop.at(v))
        for kind, lo, hi in (("confidence", 1e-6, 1.0), ("entropy", 0.0, 12.0)) if calm else ():   # any layer
            v, _, ok = search_cutoff(lambda v: exit_ratio(stats, kind, v), lo, hi, target, target_tol)
            row(depth, f"{kind} exit (training-free)", f"threshold {v:.4g}" + ("" if ok else " (target missed)"),
                DepthAdapter(model, router=kind, R=L - 1, base_layers=1, threshold=v))
        for module, blob in trained:
            make = lambda v: DepthAdapter(model, router=module.kind, routers=module, bias=v,
                                          exits=bool(blob.get("exits_trained")))
            v, _, ok = search_cutoff(lambda v: eval_ppl(make(v), calib, bs), -30.0, 30.0, target, target_tol)
            row(depth, f"trained {module.describe()}", f"bias {v:.4g}" + ("" if ok else " (target missed)"), make(v))
    return table, calib


def bench_ppl():
    """quality_table on --hf with the --routers files, and whether adaptive beats static at each depth."""
    if not hf:
        raise SystemExit("error: --mode=ppl needs --hf=<model folder or name> (and --routers=<routers.pt,...> for "
                         "the trained rows)")
    paths = router_files()
    model, tok = load_real()
    if tok is None:
        raise SystemExit(f"error: {hf} has no tokenizer: the evaluation text cannot be encoded")
    L = model.config.num_hidden_layers
    T = min(block_size, getattr(model.config, "max_position_embeddings", None) or block_size)
    try:
        trained = [hf_wrap.load_routers(p, model.config) for p in paths]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    names = [d for d in dataset.split(",") if d]
    table, calib = quality_table(model, tok, trained, names, ppl_depths, T, batch_size, calib_windows, ppl_windows,
                                 seed, target_tol, lambda r: emit("ppl", r), ppl_calm, ppl_stop_tails)
    cols = ["text", "target depth", "method", "setting", "ratio", "kv-only %", "head checks %", "ppl", "vs full %",
            "agree %", "gap closed"]
    print_table(f"perplexity at matched layer calls: {hf} ({L} layers), {ppl_windows} held-out windows of {T} "
                f"tokens per text, thresholds matched on {len(calib)} windows of {names[0]}'s train split, on "
                f"{device_name()}; "
                "ratio = layer calls / (tokens * L) on the held-out text (attention alone = its share of a layer), "
                "kv-only = K/V-only work, head checks = LM-head calls of the exits, both in layers / (tokens * L); "
                "the oracles see each layer's true update, or each stop's true prediction (optimistic, not "
                "optimal: OracleSkip, OracleStop); gap closed = "
                "(static - ppl) / (static - oracle skip), above 1 beats the oracle",
                table, cols)
    for d in names:
        for depth in ppl_depths:
            at = [r for r in table if r["text"] == d and r["target depth"] == f"{100 * depth:.0f}%"]
            static = next(r for r in at if r["method"] == STATIC_ROW)
            oracle = next(r for r in at if r["method"] == ORACLE_ROW)
            best = min((r for r in at if r is not static and not r["method"].startswith("oracle")),
                       key=lambda r: r["ppl"])
            print(f"{d}, {100 * depth:.0f}% of layer calls: best adaptive is {best['method']} (ppl {best['ppl']:.3f}, "
                  f"{best['vs full %']:+.1f}% vs full) vs static drop {static['ppl']:.3f}: adaptive "
                  f"{'BEATS' if best['ppl'] < static['ppl'] else 'does NOT beat'} static; gap closed "
                  f"{fmt(best['gap closed'])} toward the oracle's {oracle['ppl']:.3f} ({oracle['vs full %']:+.1f}%)")


# -----------------------------------------------------------------------------
# Masked diffusion: adaptive refinement against fixed passes, quality and compute in one table

def load_trained(out_dir):
    """One of our checkpoints, in eval mode on the bench's device, and its dict."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
    model = MoR(MoRConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval().to(device), ckpt


def bench_diffusion():
    """Infilling (accuracy, and the truth's NLL under the distribution each token was committed from) and
    generation (perplexity under the judge) for every decoder, with the work and wall time each ran."""
    import numpy as np
    from diffusion import AdaptiveRefiner, masked_diffusion_loss
    model, ckpt = load_trained(diffusion_dir)
    judge, judge_ckpt = load_trained(judge_dir)
    try:
        AdaptiveRefiner().check(model)
    except ValueError as e:
        raise SystemExit(f"error: {diffusion_dir}: {e}")
    if judge_ckpt["tokenizer"] != ckpt["tokenizer"] or judge.config.mask_token >= 0:
        raise SystemExit(f"error: the judge ({judge_dir}) must be an autoregressive model with the diffusion "
                         f"model's tokenizer: train it with python train.py config/vanilla_tiny.py")
    T, mask = model.config.block_size, model.config.mask_token
    if gen_prompt + gen_tokens > min(T, judge.config.block_size):
        raise SystemExit(f"error: gen_prompt + gen_tokens ({gen_prompt + gen_tokens}) exceed a model's block_size")
    cfg = ckpt["config"]
    val = data.load_split(data.prepare(cfg["dataset"], cfg["tokenizer"], cfg["data_dir"]), "val")
    starts = np.linspace(0, len(val) - T - 1, infill_windows + gen_samples).astype(np.int64)
    windows = torch.stack([torch.from_numpy(val[s:s + T].astype(np.int64)) for s in starts]).to(device)
    passages, prompts = windows[:infill_windows], windows[infill_windows:, :gen_prompt + gen_tokens]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = sum(float(masked_diffusion_loss(model, passages, mask, gen)) for _ in range(8)) / 8

    table, tasks = compare_decoders(model, judge, passages, prompts, gen)
    report("diffusion", f"masked diffusion: {diffusion_dir} (validation NLL bound {bound:.3f} nats/token), "
           f"{infill_windows} validation passages of {T} tokens per infilling rate (most likely token), "
           f"{gen_samples} generations of {gen_tokens} tokens after {gen_prompt} (blocks of {gen_block}, "
           f"temperature {gen_temperature}) scored by {judge_dir}; compute and time saved against fixed 4; "
           f"wall = median of {repeats}, on {device_name()}", table,
           ["task", "decoder", "accuracy %", "nll", "gen ppl", "easy/medium/hard %", "passes", "mean recursions",
            "token-layer ops", "compute saved %", "wall ms", "time saved %"])
    for task, rate in tasks:   # the claim: confidence as accurate as fixed 4, for less compute and time
        if rate is None:
            continue
        conf, base = [next(r for r in table if r["task"] == task and r["decoder"] == d)
                      for d in ("confidence", "fixed 4")]
        gap = conf["accuracy %"] - base["accuracy %"]
        held = gap >= -0.5 and conf["compute saved %"] >= 30 and conf["time saved %"] >= 20
        print(f"{task}: confidence vs fixed 4: accuracy {gap:+.2f} points, {conf['compute saved %']:.1f}% fewer "
              f"token-layer ops, {conf['time saved %']:.1f}% less wall time: the claim "
              f"(within 0.5 points, >= 30% fewer ops, >= 20% less time) {'HOLDS' if held else 'FAILS'}")


def diffusion_decoders():
    """(name, RefinementConfig) of every row: fixed_passes passes, and each adaptive strategy."""
    from diffusion import RefinementConfig as Config
    return [(f"fixed {n}", Config(strategy="fixed", max_recursions=n, cache_committed=False)) for n in fixed_passes] + [
        ("fixed 4, cached", Config(strategy="fixed", cache_committed=True)),
        ("confidence, exact passes", Config(cache_committed=False)),
        ("confidence", Config()),
        ("confidence, no skip", Config(skip_confident_tokens=False)),
        ("entropy", Config(strategy="entropy")),
        ("gradient", Config(strategy="gradient")),
        ("preset max_speed", Config.preset("max_speed")),
        ("preset max_quality", Config.preset("max_quality")),
    ]


def judge_nll(judge, x):
    """Mean NLL (nats) of x's tokens after gen_prompt under the autoregressive judge."""
    with torch.no_grad():
        logp = judge(x[:, :-1])[0].float().log_softmax(-1)[:, gen_prompt - 1:]
    return float(-logp.gather(-1, x[:, gen_prompt:, None]).mean())


def compare_decoders(model, judge, passages, prompts, generator):
    """bench_diffusion's rows: every decoder of diffusion_decoders() on each task, with the same hidden positions
    and (seed reseeds each run) the same draws for all. -> (rows, [(task, rate)])."""
    from dataclasses import replace
    from diffusion import AdaptiveRefiner
    mask, (n, T) = model.config.mask_token, passages.shape
    table = [{"task": "generate", "decoder": "(validation text)", "gen ppl": math.exp(judge_nll(judge, prompts))}]
    tasks = [(f"infill {100 * r:.0f}%", r) for r in mask_rates] + [("generate", None)]
    for task, rate in tasks:
        if rate is not None:   # the same hidden positions for every decoder
            order = torch.rand(n, T, generator=generator).argsort(dim=1)[:, :round(rate * T)]
            hidden = torch.zeros(n, T, dtype=torch.bool).scatter(1, order, True).to(passages.device)

        def run(refiner):
            refiner.reset_stats()
            torch.manual_seed(seed)
            if rate is None:
                return refiner.generate(model, prompts[:, :gen_prompt], gen_tokens), refiner.get_stats()
            return refiner.apply_adaptive_refinement(model, passages.masked_fill(hidden, mask), True), \
                refiner.get_stats()

        generating = dict(block_length=gen_block, temperature=gen_temperature)
        refiners = {name: AdaptiveRefiner(c if rate is not None else replace(c, **generating))
                    for name, c in diffusion_decoders()}
        timings = interleaved([(name, lambda r=r: run(r)) for name, r in refiners.items()])
        for name, ((out, stats), median_s, _, _) in timings.items():
            row = {"task": task, "decoder": name, "passes": stats["total_steps"], "wall ms": 1000 * median_s,
                   "mean recursions": stats["mean_recursions_per_token"], "token-layer ops": stats["token_layer_ops"],
                   "easy/medium/hard %": "/".join(f"{100 * stats[k] / stats['tokens_processed']:.0f}"
                                                  for k in ("easy_tokens", "medium_tokens", "hard_tokens"))}
            if rate is None:
                row["gen ppl"] = math.exp(judge_nll(judge, out))
            else:
                (x, logprobs), truth = out, passages[hidden]
                row["accuracy %"] = 100 * float((x[hidden] == truth).float().mean())
                row["nll"] = float(-logprobs[hidden].gather(-1, truth[:, None]).mean())
            table.append(row)
    for r in table:   # savings against fixed 4, task by task
        base = next((b for b in table if b["task"] == r["task"] and b["decoder"] == "fixed 4"), None)
        if base and "wall ms" in r:
            r["compute saved %"] = 100 * (1 - r["token-layer ops"] / base["token-layer ops"])
            r["time saved %"] = 100 * (1 - r["wall ms"] / base["wall ms"])
    return table, tasks


def device_name():
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{device_type} ({n} thread{'s' if n != 1 else ''})"


if __name__ == "__main__":
    MODES = {"all": (bench_train, bench_decode, bench_hf), "train": (bench_train,), "decode": (bench_decode,),
             "hf": (bench_hf,), "spec": (bench_speculative,), "ppl": (bench_ppl,), "gpu": (bench_gpu,),
             "diffusion": (bench_diffusion,)}
    if mode not in MODES:
        raise SystemExit(f"error: mode must be one of {', '.join(MODES)}, got {mode!r}")
    print(f"nanoMoR bench on {device_name()}, torch {torch.__version__}, size {size}, {time.strftime('%Y-%m-%d')}")
    for run in MODES[mode]:
        run()
    if report_csv:
        print(f"appended {len(rows)} rows to {report_csv}")

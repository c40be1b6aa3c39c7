"""
Sample from a trained nanoMoR checkpoint, or from a Hugging Face model through the
depth-adaptive adapter (hf_wrap.py), and show how deep each token went.

  python sample.py --out_dir=out-mor-tiny --return_depth_trace
  python sample.py --hf smollm2-135m --no_skip --prompt "The capital of France is"   # the model's own greedy text
  python sample.py --routers out-smollm2-ffn/routers.pt --keep_ratio 0.9     # the file names its kind and model
  python sample.py --speculative=4 --lookup=3 --routers=out-spec-drafter-greedy/routers.pt   # --no_skip's text
"""
import contextlib
import os
import time
from csv import writer as csv_writer

import torch

import data
import hf_wrap
import speculative as spec
from configurator import (autocast_context, autodetect_device, configure, plot_depth_hist, require, require_at_least,
                          set_threads, write_prometheus, write_stats_csv)

# -----------------------------------------------------------------------------
out_dir = "out"                 # folder with ckpt.pt (our own models)
hf = ""                         # a hub name, folder, .gguf file or smollm2-135m (built in): through hf_wrap.py
prompt = "\n"                   # the prompt text, or FILE:path/to/prompt.txt
num_samples = 1
max_new_tokens = 500
temperature = None              # None: 0.8 for our checkpoints, 0 (greedy) with --hf
top_k = 200                     # sample among the top_k tokens (None = all)
seed = 1337
stream = True                   # print the text as it is made (num_samples > 1: the first sample; diffusion: at end)
device = "auto"                 # auto | cpu | cuda | mps
dtype = "auto"                  # auto (bf16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
threads = 0                     # CPU threads (0: torch's default); 1 is often much faster on a busy shared machine
return_depth_trace = False      # print every token with the depth it ran to
csv = ""                        # write the depth histogram to this CSV (diffusion: every statistic)
plot = ""                       # draw the depth histogram to this PNG (needs matplotlib)
# the Hugging Face adapter (hf_wrap.py)
router = "none"                 # one of hf_wrap.ROUTERS (the trained kinds: --routers sets it)
R = 4                           # groups the routed layers are split into (fixed, confidence, entropy)
base_layers = 2                 # layers every token runs before routing starts
keep_ratio = None               # skip / ffn / expert_choice: the share of the routed layer calls kept (the file's
                                # calibrated cutoffs); None: bias decides
depth = None                    # fixed: groups every token runs (0..R)
threshold = None                # CALM's exit test: confidence: a top-1 probability; entropy: nats. None: default
bias = None                     # trained routers: a gate passes when its logit > bias (None: the file's)
routers = ""                    # a file from tune.py: routers, an exit head or a drafter (it names its model)
random_routers = False          # untrained routers for the trained kinds: speed measurements only
exit_threshold = None           # trained exit gates: exit when the gate > this (None = the file's)
no_exits = False                # ignore trained exit gates
no_skip = False                 # run every layer for every token: the exact full-depth mode
speculative = 0                 # K > 0: the router (or a drafter file) drafts K tokens, the full model verifies
                                # them: exactly --no_skip's text (speculative.py; 0 = off)
lookup = 0                      # speculative: n > 0 drafts by prompt lookup of n-grams (no model call)
compile = False                 # --hf: decode compiled (torch.compile; the first call compiles, ~10-40 s on a CPU):
                                # a static plan's step whole, a routed kind's layers (decisions eager), a draft's steps
                                # and speculative decoding's verify pass
profile = False                 # --hf: print torch.profiler's top operators by self CPU time (where decode time goes)
adapt_k = True                  # speculative: grow K after full acceptance, shrink it after an early rejection
chat = "auto"                   # auto (use the chat template when the tokenizer has one) | yes | no
trust_remote_code = False
prometheus = ""                 # also write the statistics in Prometheus text format here
export_hf = ""                  # instead of sampling: write out_dir's checkpoint as a transformers folder here
# masked-diffusion checkpoints (train.py objective='diffusion'): adaptive refinement (diffusion.py)
diffusion = False               # refine a fully masked continuation (automatic for a diffusion checkpoint)
preset = "balanced"             # balanced | max_speed | max_quality: the values of the keys below left at None
strategy = "confidence"         # confidence | entropy | gradient | fixed (the baseline: max_recursions full passes)
min_recursions = None           # passes for an easy token
max_recursions = None           # passes for a hard token; fixed: passes per block
confidence_high = None          # scores from here up are easy
confidence_low = None           # scores from here down are hard (linear in between)
skip_threshold = None           # a token scoring this is committed at once (with skip_confident_tokens)
skip_confident_tokens = True
parallel_acceptance = True      # commit every due token in one pass (False: the most confident one per pass)
batch_by_difficulty = True      # one call per pass for all samples (False: one call per sample)
cache_committed = True          # committed tokens stop computing, their K/V cached (False: exact full passes)
block_length = 16               # positions refined together, left to right (0: the whole continuation)
# -----------------------------------------------------------------------------
config = configure(globals())
MAX_SPECULATIVE = 64
set_threads(threads)
torch.manual_seed(seed)
device = autodetect_device(device)
device_type = device.split(":")[0]
ctx, dtype = autocast_context(device_type, dtype)
if isinstance(prompt, str) and prompt.startswith("FILE:"):
    path = prompt[5:]
    require(os.path.exists(path), f"prompt file {path} not found")
    with open(path, encoding="utf-8") as f:
        prompt = f.read()
require(prompt, "the prompt is empty: give at least one character, e.g. --prompt='ROMEO:' (the default is a newline) "
                "or --prompt=FILE:path/to/prompt.txt")
require_at_least(config, num_samples=1, max_new_tokens=0)
require(0 <= speculative <= MAX_SPECULATIVE,
        f"speculative={speculative}: the tokens drafted per cycle, an int >= 1 (0: off) and at most {MAX_SPECULATIVE}: "
        "a cycle verifies K + 1 tokens in one pass, and a draft that long is almost never accepted whole, so a larger "
        "K only spends compute (4 is a good start)")
require(top_k is None or top_k >= 1, f"top_k={top_k}: sample among the top_k most likely tokens, so it is an int >= 1 "
                                     "(or None, --top_k=None: every token)")
require(temperature is None or temperature >= 0, f"temperature={temperature}: it is >= 0 (0 = greedy; 1 = the model's "
                                                 "own distribution; lower is sharper)")
require(chat in ("auto", "yes", "no"), f"chat={chat!r}: auto (the chat template when the tokenizer has one), yes or no")
require(router in hf_wrap.ROUTERS or router == "drafter", f"router={router!r}: one of {', '.join(hf_wrap.ROUTERS)}")
require(keep_ratio is None or 0 < keep_ratio <= 1, f"keep_ratio={keep_ratio}: the share of the routed layer calls "
                                                   "kept, in (0, 1] (1.0: full depth; None: the bias decides)")
require(depth is None or depth >= 0, f"depth={depth}: fixed's groups every token runs, an int >= 0")
require(base_layers >= 1, f"base_layers={base_layers}: the layers every token runs first, an int >= 1")
require(exit_threshold is None or 0 < exit_threshold < 1, f"exit_threshold={exit_threshold}: an exit gate's "
                                                          "probability, in (0, 1) (None: the file's)")
require(threshold is None or threshold >= 0, f"threshold={threshold}: CALM's exit test, a top-1 probability in (0, 1] "
                                             "(confidence) or nats >= 0 (entropy)")
require(block_length >= 0, f"block_length={block_length}: positions refined together, an int >= 0 (0: all at once)")


def streamer(decode, ids=()):
    """--stream: the first row, printed as it is generated (data.TextStreamer). The rows of a batch decode together
    and end together, and rows interleaved on one terminal read as noise: the first one shows the progress, the
    others print when the batch ends, so the output is --stream=False's either way."""
    return data.TextStreamer(decode, ids) if stream else None


def print_samples(texts, shown=None):
    """Each sample's text, then a separator; shown: the streamer that printed the first one already."""
    for i, text in enumerate(texts):
        if i == 0 and shown is not None:
            shown.end()
        else:
            print(text)
        print("---------------")


def print_depths(stats, trace=None):
    """The depth histogram as bars; trace: (text, depth) per token, printed with the depth underneath."""
    n = max(1, stats["tokens"])
    print(f"\ndepth over {stats['tokens']} tokens: mean {stats['mean_depth']:.2f}, "
          f"layer calls {stats['layer_calls']:,.0f} of {stats['layer_calls_full']:,} "
          f"(compute saved {stats['compute_saved_pct']:.1f}%)")
    w = len(str(len(stats["depth_hist"]) - 1))
    for d, c in enumerate(stats["depth_hist"]):
        if c or len(stats["depth_hist"]) <= 12:            # per-layer routers (depth in layers): used depths only
            print(f"  depth {d:>{w}} | {'#' * round(40 * c / n):<40} {c:6d} ({100 * c / n:5.1f}%)")
    if trace is not None:
        # one character per depth, so digits never run together: 0-9, a = 10, ..., z = 35, + beyond
        print("\ndepth trace (character under each token = its depth: recursion steps, groups or layers it ran"
              + ("; a = 10, b = 11, ...):" if len(stats["depth_hist"]) > 10 else "):"))
        width, top, bottom = 80, "", ""
        for text, d in trace:
            text = text.replace("\n", "⏎").replace("\t", "→") or "∅"
            if len(top) + len(text) > width:
                print(top + "\n" + bottom)
                top, bottom = "", ""
            top += text
            bottom += ("0123456789abcdefghijklmnopqrstuvwxyz"[d] if d < 36 else "+").ljust(len(text))
        print(top + "\n" + bottom)


def save_depths(stats):
    """--csv: one row per depth (depth, tokens, fraction); --plot: the histogram drawn."""
    if csv:
        n = max(1, stats["tokens"])
        with open(csv, "w", newline="") as f:
            w = csv_writer(f)
            w.writerow(["depth", "tokens", "fraction"])
            w.writerows([d, c, f"{c / n:.6f}"] for d, c in enumerate(stats["depth_hist"]))
        print(f"wrote the depth histogram to {csv}")
    if plot:
        plot_depth_hist(stats, plot)


def read_routers():
    """--routers names its format and model. -> (router, hf, whether it is a drafter)."""
    try:
        blob = hf_wrap.read_router_file(routers)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    is_drafter = blob["format"] == hf_wrap.DRAFTER_FILE_FORMAT
    kind = "none" if is_drafter else blob["router"] if router == "none" else router
    require(hf or blob.get("model"), f"{routers} does not record its model: pass --hf <the model it was trained for>")
    return kind, hf or blob.get("model"), is_drafter


# python tune.py --hf smollm2-135m --router <kind>, timed on a shared 2-core CPU (one thread, other jobs running):
# expert_choice 18.2 min, 3.2 of them making its text (the model's answers: the first run of any kind makes them);
# skip 21 min on the text made, under a heavier load
TUNE_TIME = ("18-29 min on a 2-core CPU, measured (the first run's 3 min of answers included; 29 with other jobs "
             "running); not measured on a GPU")


def default_routers(kind):
    """No --routers for a trained kind: tune.py's default file for --hf (data.default_routers), if it exists; none
    (untrained routers) with --random_routers or where nothing is routed (keep_ratio 1); else the refusal."""
    path = data.default_routers(hf, kind)
    if os.path.isfile(path):
        print(f"routers: {path} (tune.py's for {hf}; --routers=<file> picks another)")
        return path
    require(random_routers or (keep_ratio == 1.0 and kind != "token_choice"),
            f"no trained {kind} routers for {hf} (none at {path}). Tune them once: python tune.py --hf {hf} --router "
            f"{kind} ({TUNE_TIME}); or pass --routers=<a file from tune.py>. --random_routers runs untrained ones, "
            "for speed measurements only.")
    return ""


def hf_prompt(tok):
    """The prompt in the model's tokens (its chat template when it has one), num_samples rows on the device."""
    use_chat = chat == "yes" or (chat == "auto" and getattr(tok, "chat_template", None))
    if use_chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    return ids.to(device).repeat(num_samples, 1)          # too long for the context: new_cache says so


def sample_hf(kind, is_drafter):
    """A Hugging Face model through the adapter (router `kind`), or, with --speculative, verifying its drafts."""
    require(not lookup or speculative, f"--lookup={lookup} drafts for speculative decoding: pass --speculative=K "
                                       "(tokens per cycle) too, e.g. --speculative=4.")
    require(not is_drafter or speculative, f"{routers} is a drafter: it only drafts for speculative decoding: pass "
                                           "--speculative=K (e.g. 4); --no_skip decodes without it.")
    hf_dtype = {"auto": "bfloat16" if device_type == "cuda" else "float32"}.get(config["dtype"], config["dtype"])
    model, tok = data.load_hf(hf, device=device, dtype=hf_dtype, trust_remote_code=trust_remote_code)
    require(tok is not None, f"{hf} has no tokenizer, so a text prompt cannot be encoded")
    try:
        adapter = hf_wrap.DepthAdapter(model, router="none" if no_skip else kind, R=R, base_layers=base_layers,
                                       keep_ratio=keep_ratio, depth=depth, threshold=threshold, bias=bias,
                                       router_path=None if is_drafter else routers or None,
                                       exit_threshold=exit_threshold, exits=not no_exits,
                                       random_routers=random_routers)
        drafter = spec.load_drafter(routers, model, hf_wrap.TUNE_COMMAND)[0] if is_drafter else None
        ids = hf_prompt(tok)
        decode = lambda row: tok.decode(row, skip_special_tokens=True)     # the new tokens only, as printed
        shown = streamer(decode)
        with (torch.profiler.profile() if profile else contextlib.nullcontext()) as profiler:
            if speculative:
                out, stats = spec.generate(adapter, ids, max_new_tokens=max_new_tokens, K=speculative, adapt_k=adapt_k,
                                           temperature=temperature or 0.0, top_k=top_k, eos_token_id=tok.eos_token_id,
                                           lookup=lookup, drafter=drafter, return_trace=return_depth_trace,
                                           on_tokens=shown, compile=compile)
            else:
                out, stats = adapter.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature or 0.0,
                                              top_k=top_k, eos_token_id=tok.eos_token_id,
                                              return_trace=return_depth_trace, on_tokens=shown, compile=compile)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print_samples((decode(row[ids.shape[1]:]) for row in out), shown)
    print(f"{stats['new_tokens']} new tokens x {stats['batch']} rows: {stats['tokens_per_s']:.1f} tok/s, "
          f"{stats['ms_per_token']:.2f} ms per {'token' if speculative else 'decode step'} (prefill "
          f"{1000 * stats['prefill_s']:.0f} ms)" + (", the compiling included (--compile)" if compile else ""))
    if adapter.random_routers:
        print(f"random routing: untrained {adapter.router} routers (--random_routers), for speed measurements only; "
              + ("the full model verified every token" if speculative else "the text and the depths mean nothing"))
    if speculative:
        print_speculative(stats)
    else:
        print_routed(adapter, stats, tok, out)


def print_speculative(stats):
    """What the draft bought."""
    source = stats["draft"]
    draft = f"{source} draft" if not lookup else f"prompt-lookup draft ({lookup}-gram" + (
        f", else {source})" if source != "none" else ")")
    print(f"speculative decoding, {draft} ({stats['draft_layers']:.1f} layers per model draft), "
          f"K={speculative}" + (f" adaptive: final {stats['k_final']}, mean {stats['k_mean']:.2f}" if adapt_k else "")
          + f": {stats['acceptance_rate']:.1%} of {stats['drafted']} drafts accepted, {stats['tokens_per_cycle']:.2f} "
          f"tokens per cycle over {stats['cycles']} cycles; draft {stats['draft_s']:.2f} s, verify "
          f"{stats['verify_s']:.2f} s")
    if csv:
        write_stats_csv(stats, csv)
    if prometheus:
        write_prometheus(stats, prometheus)


def print_routed(adapter, stats, tok, out):
    """The depths the adapter's tokens ran to, and what decided them."""
    trace = stats.get("trace")                                  # --return_depth_trace: (row, column, depth)
    print_depths(stats, trace and [(tok.decode([int(out[0, p])]), d) for b, p, d in trace if b == 0])
    if "easy" in stats:
        print(f"  easy {stats['easy']}, medium {stats['medium']}, hard {stats['hard']} tokens")
    if adapter.routers is not None:   # trained routers: what decided, and the K/V-only work they left
        cut = f"keep_ratio {keep_ratio} (calibrated cutoffs)" if keep_ratio else f"bias {adapter.bias:.4g}"
        print(f"  {adapter.router} routers: {cut}; exit gates "
              + (f"at layers {adapter.routers.exit_layers}, exit_threshold {adapter.exit_threshold}"
                 if adapter.use_exits else "off")
              + f"; K/V-only layer fills {stats['kv_only_layer_calls']:,}")
    save_depths(stats)
    if prometheus:
        write_prometheus(stats, prometheus)


def sample_checkpoint():
    """One of our own checkpoints: sampling with its depths, or refinement (masked diffusion), or --export_hf."""
    from configurator import load_checkpoint
    from model import MoR, MoRConfig, export_hf as export
    require(not compile, "--compile decodes through the Hugging Face adapter: pass --hf=<model> (our own checkpoints "
                         "decode compiled in bench.py --mode=decode --graphs=on)")
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
    model = MoR(MoRConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    tok = data.Tokenizer.from_meta(ckpt["tokenizer"])
    if export_hf:
        try:
            export(model.float(), export_hf, tok)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        print(f"wrote a transformers LlamaForCausalLM to {export_hf}: python sample.py --hf {export_hf}")
        return
    try:
        ids = tok.encode(prompt)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # as nanoGPT, a prompt longer than the context keeps its last block_size tokens: generation slides past the
    # context anyway (diffusion.py checks its own prompt: refinement needs room for a block after it)
    refine, bs = diffusion or model.config.mask_token >= 0, model.config.block_size
    if len(ids) > bs and not refine:
        print(f"note: the prompt is {len(ids)} tokens, longer than this model's context of {bs} (block_size): "
              f"cropped to its last {bs}")
        ids = ids[-bs:]
    x = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    if refine:
        return sample_diffusion(model, tok, x)
    shown = streamer(tok.decode, ids)                           # the prompt first, as the text below prints it
    t0 = time.time()
    with ctx:
        out, depths = model.generate(x, max_new_tokens, temperature=0.8 if temperature is None else temperature,
                                     top_k=top_k, return_depths=True, on_tokens=shown)
    dt = time.time() - t0
    print_samples((tok.decode(row.tolist()) for row in out), shown)
    n_new = num_samples * max_new_tokens
    print(f"{n_new} new tokens in {dt:.2f} s: {n_new / dt:.1f} tok/s, {1000 * dt / max(1, max_new_tokens):.2f} ms/step"
          f" (batch {num_samples}, prefill included)")
    stats = model.depth_stats(depths)
    trace = zip([tok.decode([t]) for t in out[0].tolist()], depths[0].tolist()) if return_depth_trace else None
    print_depths(stats, trace)
    save_depths(stats)


def sample_diffusion(model, tok, x):
    """A masked-diffusion checkpoint: a fully masked continuation, refined (diffusion.py)."""
    from dataclasses import fields
    from diffusion import AdaptiveRefiner, RefinementConfig, describe_stats
    try:
        settings = {f.name: config[f.name] for f in fields(RefinementConfig) if config[f.name] is not None}
        refiner = AdaptiveRefiner(RefinementConfig.preset(preset, **{
            **settings, "temperature": 0.8 if temperature is None else temperature}))
        with ctx:
            out = refiner.generate(model, x, max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print_samples(tok.decode(row.tolist()) for row in out)
    stats = refiner.get_stats()
    print(describe_stats(stats))
    if csv:
        write_stats_csv(stats, csv)
    if prometheus:
        write_prometheus(stats, prometheus, prefix="nanomor_diffusion")


# -----------------------------------------------------------------------------
# a router file says what it is (and which model it belongs to); --hf: the adapter; else our own checkpoint
kind, is_drafter = router, False
if router == "drafter":                                   # old spellings, for one release
    print("note: --router=drafter is deprecated: a drafter is a draft source, not a router; --routers=<its file> "
          "--speculative=K is enough")
    require(routers, "--router=drafter needs --routers=<a drafter file from tune.py --drafter=True>")
    kind = router = "none"
if routers and (not hf or router == "none") and not no_skip:
    kind, hf, is_drafter = read_routers()
elif hf and kind in hf_wrap.ROUTER_KINDS and not routers and not no_skip:
    routers = default_routers(kind)
if hf and kind in hf_wrap.ROUTER_KINDS and threshold is not None:
    print(f"note: --threshold for trained routers is deprecated: it is their logit bias, --bias={threshold}")
    bias, threshold = threshold, None
if hf:
    sample_hf(kind, is_drafter)
else:
    sample_checkpoint()

"""
Config for train.py, sample.py and bench.py: nanoGPT's "poor man's configurator", its quirks fixed.

A script defines plain globals at the top (one per setting, with a comment), then calls
    config = configure(globals())   # edits the script's globals in place, returns {key: value}
and you run it as
    python train.py config/tiny.py --max_iters=100 --compile=false --dropout 0

Positional args are config files (plain Python assignments), applied in order, then the
--key=value overrides; `python train.py --help` lists every key. Fixed from nanoGPT:
--compile=false (any case), --dropout=0 (int for a float key), None-default keys, values
with '=', `--key value`, bare `--flag`, and unknown keys that suggest the key you meant.

Also here, what every script shares: require(), CPU threads, device and autocast setup, the optional plots, the
statistics writers, atomic checkpoints, the learning-rate schedule and the GPU peaks behind MFU.
"""
import ast
import contextlib
import csv
import difflib
import io
import math
import os
import re
import sys
import tokenize
import types

import torch

CONFIG_TYPES = (bool, int, float, str, type(None), list, tuple)  # what counts as a config global
BOOLS = {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}


def _fail(msg):
    raise SystemExit(f"error: {msg}")  # one clean line on stderr, exit code 1


def _expects(default):
    # words for error messages; bool before int, as True is an int
    for kind, words in ((bool, 'a bool (on the command line: true/false/yes/no/1/0)'), (int, 'an int'),
                        (float, 'a float'), (str, 'a string'), (list, 'a list like 1,2,3 or [1,2,3]'),
                        (tuple, 'a tuple like 1,2,3')):
        if isinstance(default, kind):
            return words
    return 'any Python literal or a string'


def _parse(text, default):
    """A command-line string -> a value of the default's type. Raises ValueError if it is not one."""
    if isinstance(default, bool):  # nanoGPT used literal_eval, so only 'False' worked, not 'false'
        if text.lower() not in BOOLS:
            raise ValueError(text)
        return BOOLS[text.lower()]
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            number = float(text)  # 1e3 is a fine way to write 1000 ...
            if not number.is_integer():
                raise  # ... but 0.5 is not an int
            return int(number)
    if isinstance(default, float):
        return float(text)  # nanoGPT: --dropout=0 gave an int and failed the type check
    if isinstance(default, str):
        return None if text == 'None' else text  # as typed: --prompt=123 stays the string '123'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text  # not a Python literal: keep it as a string
    if default is None:
        return value  # nanoGPT: a None default could never be set (the type check failed)
    if not isinstance(value, (list, tuple)):  # bare form 1,0.5,0.25 (one item gives a 1-item list)
        value = [_parse(item.strip(), None) for item in text.split(',') if item.strip()]
    return type(default)(value)


def _check(value, default):
    """A Python value from a config file -> the value to use. Raises ValueError on a wrong type."""
    if default is None:
        return value
    if isinstance(default, float) and type(value) in (int, float):
        return float(value)  # learning_rate = 1 is fine for a float key
    if isinstance(default, str) and value is None:
        return None
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is type(default):  # exact: a bool key wants a bool, an int key an int (not True)
        return value
    raise ValueError(value)


def _unknown(key, keys, g, where=''):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ''
    script = os.path.basename(g.get('__file__', 'train.py'))
    _fail(f"unknown config key '{key}'{where}.{hint} Run python {script} --help for all keys.")


def _print_help(g, keys):
    # each key's trailing comment in the script's source; tokenize (not a regex): a '#' in a string is no comment
    source = open(g['__file__']).read() if os.path.isfile(g.get('__file__', '')) else ''
    comments, first_line = {}, {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip('#').strip()
    except (tokenize.TokenError, SyntaxError):
        pass  # unparseable source: help lists the keys without comments
    for n, line in enumerate(source.splitlines(), 1):
        if '=' in line and not line[:1].isspace():  # top level only
            first_line.setdefault(line.split('=')[0].strip(), n)
    if g.get('__doc__'):
        print(g['__doc__'].strip() + '\n')
    script = os.path.basename(g.get('__file__', 'train.py'))
    print(f"usage: python {script} [config/file.py ...] [--key=value | --key value | --flag ...]\n")
    rows = [(f"--{k}={g[k]!r}", comments.get(first_line.get(k), '')) for k in keys]
    width = max((len(flag) for flag, _ in rows), default=0)
    for flag, comment in rows:
        print(f"  {flag:<{width}}  # {comment}" if comment else f"  {flag}")


def _apply_file(path, g, keys):
    if not path.endswith('.py'):
        _fail(f"unexpected argument '{path}': config files end in .py, overrides look like --key=value")
    if not os.path.isfile(path):
        config_dir = os.path.join(os.path.dirname(os.path.abspath(g.get('__file__', '.'))), 'config')
        found = sorted(f'config/{f}' for f in os.listdir(config_dir) if f.endswith('.py')) \
            if os.path.isdir(config_dir) else []
        _fail(f"config file '{path}' not found." + (f" Available: {', '.join(found)}" if found else ''))
    namespace = {}  # not globals() (nanoGPT's): a file cannot clobber the script
    with open(path) as f:
        source = f.read()
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:  # the file, the line and the message: no traceback through this file
        _fail(f"{path}, line {e.lineno}: {e.msg}" + (f": {e.text.strip()}" if e.text else ''))
    exec(code, namespace)
    applied = []
    for key, value in namespace.items():
        if key.startswith('_') or isinstance(value, types.ModuleType):
            continue  # __builtins__, `import math`, private helpers
        if key not in keys:
            _unknown(key, keys, g, where=f" in {path}")
        try:
            g[key] = _check(value, g[key])
        except ValueError:
            _fail(f"{path} sets {key} = {value!r}, but {key} expects {_expects(g[key])} "
                  f"(default {g[key]!r})")
        applied.append(f"{key} = {g[key]!r}")
    print(f"Overriding config with {path}: {', '.join(applied) or '(nothing)'}")


def configure(g, argv=None):
    """Apply config files, then --key=value overrides, to the script's globals g (in place).
    -> {key: final value} for every config key (to log, or save in a checkpoint)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = [k for k, v in g.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]
    if '--help' in argv or '-h' in argv:
        _print_help(g, keys)
        raise SystemExit(0)
    i = 0
    while i < len(argv) and not argv[i].startswith('-'):  # 1) config files, in order
        _apply_file(argv[i], g, keys)
        i += 1
    while i < len(argv):  # 2) --key=value / --key value / --flag
        arg = argv[i]
        if not arg.startswith('--'):
            _fail(f"config file '{arg}' must come before the --key=value overrides" if arg.endswith('.py')
                  else f"unexpected argument '{arg}': overrides look like --key=value (e.g. --max_iters=100)")
        key, has_value, text = arg[2:].partition('=')  # first '=' only: --prompt=a=b gives 'a=b'
        if key not in keys:
            _unknown(key, keys, g)
        default = g[key]
        if not has_value:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if isinstance(default, bool):  # bare --flag means True, unless a bool word follows
                text = 'true'
                if nxt is not None and nxt.lower() in BOOLS:
                    text, i = nxt, i + 1
            elif nxt is None or (nxt.startswith('--') and nxt[2:].partition('=')[0] in keys):
                _fail(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE "
                      f"({_expects(default)}, default {default!r})")
            else:
                text, i = nxt, i + 1  # the next token, even if it starts with '-' (e.g. -1)
        try:
            value = _parse(text, default)
        except ValueError:
            _fail(f"bad value for --{key}: expected {_expects(default)} (default {default!r}), got {text!r}")
        g[key] = value
        print(f"Overriding: {key} = {value!r}")
        i += 1
    return {k: g[k] for k in keys}


def error_line(e):
    """An exception quoted whole, in one line: its type and its first line (torch's and transformers' messages run
    on for paragraphs, and one cut at a length reads as garbled); for torch.load's weights_only refusal, the line
    that names the reason."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
    why = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return f"{type(e).__name__}: {why}" if why else type(e).__name__


def require(ok, msg):
    """A script's own check right after configure(): one clean error line instead of a traceback later."""
    if not ok:
        _fail(msg)


def require_at_least(config, **lowest):
    """require() for counts, e.g. require_at_least(config, batch_size=1, max_iters=0)."""
    for key, low in lowest.items():
        require(config[key] >= low, f"{key} must be >= {low}, got {config[key]!r}: set --{key} to {low} or more")


# -----------------------------------------------------------------------------
# Runtime setup shared by every script

def autodetect_device(device='auto'):
    """'auto' -> cuda, else mps, else cpu; any other device is checked to exist."""
    has_mps = hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if has_mps else 'cpu'
    kind = device.split(':')[0]
    if kind not in ('cuda', 'mps', 'cpu'):
        _fail(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if (kind == 'cuda' and not torch.cuda.is_available()) or (kind == 'mps' and not has_mps):
        _fail(f"device '{device}' was asked for but is not available here. Use --device=auto (or cpu).")
    return device


def set_threads(threads=0):
    """A script's --threads, printed in its first lines: > 0 sets torch's CPU threads (torch.set_num_threads), 0
    keeps torch's default (OMP_NUM_THREADS, else one per core). On a CPU that other jobs share, the threads of one
    matrix product wait for each other's busy cores: one thread is then often many times faster. -> the count."""
    require(isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0,
            f"threads={threads!r}: the CPU threads torch uses, an int >= 1 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    why = "--threads" if threads else "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else \
        "torch's default, one per core; on a busy machine --threads=1"
    print(f"{n} CPU thread{'s' if n != 1 else ''} ({why})")
    return n


def autocast_context(device, dtype='auto'):
    """-> (context manager for the forward pass, resolved dtype string). bf16/fp16 autocast on CUDA only:
    elsewhere float32, as autocast on CPU/MPS is slow or unsupported for many ops."""
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        _fail(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if not device.startswith('cuda'):
        if dtype in ('bfloat16', 'float16'):
            print(f"note: dtype={dtype} is for CUDA; running {device} in float32")
        return contextlib.nullcontext(), 'float32'
    if dtype == 'auto':  # bf16 needs Ampere or newer; fp16 (with a GradScaler) otherwise
        dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype == 'float32':
        return contextlib.nullcontext(), dtype
    return torch.amp.autocast(device_type='cuda', dtype=getattr(torch, dtype)), dtype


# -----------------------------------------------------------------------------
# Plots, to PNG files: optional (matplotlib is not a dependency)

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None after a note when matplotlib is not installed:
    a missing plotting library skips the plot, never the run."""
    try:
        import matplotlib
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); skipped")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_depth_hist(stats, path):
    """sample.py --plot: how many tokens ran to each depth (model.depth_stats / the adapter's stats)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(stats["depth_hist"])), stats["depth_hist"], color="#4a7ab5")
    ax.set_xlabel("depth (recursion steps run)")
    ax.set_ylabel("tokens")
    ax.set_title(f"mean depth {stats['mean_depth']:.2f}, compute saved {stats['compute_saved_pct']:.1f}%")
    save_figure(fig, path, "the depth histogram plot to ")


def plot_depth_history(csv_path, path):
    """train.py --plot: the share of tokens at each depth against iteration, from its depth_hist.csv, one
    stacked-area panel per kind (train batches, val with the causal rule)."""
    if not os.path.isfile(csv_path):
        print(f"note: no {csv_path} to plot (it needs a router and log_depth_hist_every > 0); skipped")
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    share = {}  # kind -> depth -> iter -> fraction of tokens
    for r in rows:
        share.setdefault(r["kind"], {}).setdefault(int(r["depth"]), {})[int(r["iter"])] = float(r["fraction"])
    plt = pyplot()
    if plt is None or not share:
        return
    fig, axes = plt.subplots(1, len(share), figsize=(6 * len(share), 3.5), squeeze=False)
    for ax, (kind, by_depth) in zip(axes[0], sorted(share.items())):
        iters = sorted({it for by_iter in by_depth.values() for it in by_iter})
        depths = sorted(by_depth)
        ax.stackplot(iters, [[by_depth[d].get(it, 0.0) for it in iters] for d in depths],
                     labels=[f"depth {d}" for d in depths])
        ax.set_xlabel("iteration")
        ax.set_ylabel("share of tokens")
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind} tokens by depth")
        ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path, "the depth-over-training plot to ")


def save_figure(fig, path, what=""):
    """Lay out, write the PNG, and say so: 'wrote <what><path>'."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {what}{path}")


# -----------------------------------------------------------------------------
# Statistics out (sample.py --csv / --prometheus, for every path: ours, the HF adapter, diffusion)

def append_csv(path, row, fieldnames=None):
    """Append a dict row to a CSV file (train.py's logs, bench.py --report_csv), the header first if it is new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(row), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def write_stats_csv(stats, path):
    """Columns metric,value; lists become metric_0, metric_1, ...; no trace or logits."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        for key, val in stats.items():
            if key in ("trace", "logits"):
                continue
            for name, v in ([(f"{key}_{i}", v) for i, v in enumerate(val)] if isinstance(val, list) else [(key, val)]):
                w.writerow([name, v])


def write_prometheus(stats, path, prefix="nanomor"):
    """Prometheus text format (node_exporter's textfile collector): a gauge per numeric stat, the depth
    histogram as one gauge labelled by depth (hand-written: no prometheus_client)."""
    lines = []
    for key, val in stats.items():
        if key == "depth_hist":
            lines.append(f"# TYPE {prefix}_depth_tokens gauge")
            lines += [f'{prefix}_depth_tokens{{depth="{d}"}} {c}' for d, c in enumerate(val)]
        elif isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
            lines += [f"# TYPE {prefix}_{key} gauge", f"{prefix}_{key} {val}"]
    with open(path + ".tmp", "w") as f:                                       # atomic: collectors read any time
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# Checkpoints, the learning-rate schedule and MFU (train.py, tune.py, sample.py, bench.py)

def save_checkpoint(obj, path):
    """Atomic save (a temporary file, then rename): a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Load with weights_only=True (tensors and plain Python values only: no code runs)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}. Train one first (python train.py ...) "
                         f"or point out_dir at the folder that holds ckpt.pt.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({error_line(e)}): "
                         f"truncated or corrupt? Delete it and train again, or restore a copy.")
    missing = [k for k in ("model", "model_args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} is not a nanoMoR checkpoint (no {', '.join(missing)})")
    return ckpt


def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters, schedule="cosine", lr_decay_iters=0, decay_frac=0.2):
    """The learning rate at iteration `it`: linear warmup, then cosine down to min_lr (reached at
    lr_decay_iters, or max_iters when 0), or warmup-stable-decay ('wsd': flat, then the last
    decay_frac of max_iters decays linearly to min_lr)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "wsd":
        decay_start = int(max_iters * (1 - decay_frac))
        if it < decay_start:
            return learning_rate
        return learning_rate - (learning_rate - min_lr) * min(1.0, (it - decay_start) / max(1, max_iters - decay_start))
    end = lr_decay_iters or max_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, end - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched against torch.cuda.get_device_name(): the more
# specific names first.
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def gpu_peak_flops(device):
    """Peak bf16 FLOP/s of the GPU present, or None (CPU, MPS, or a GPU not in the table)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)

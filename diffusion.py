"""
Mixture-of-Recursions for masked-diffusion language models. Read model.py first.

A masked-diffusion LM (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025) is model.py's
network with two switches (MoRConfig.bidirectional, MoRConfig.mask_token): attention sees
the whole sequence, and one extra token id means [MASK].

Training (masked_diffusion_loss). Draw a masking rate t ~ U(0, 1) per sequence, replace
each token by [MASK] with probability t, and predict the originals at the masked
positions only:
    L = 1 / (B*T) * sum over masked tokens of -log p(x_i | x_t) / t
This is an upper bound on the negative log-likelihood per token (the ELBO of absorbing
diffusion). The 1/t weighs up lightly masked sequences, where each masked token is one
of few.

Sampling (AdaptiveRefiner). Every position to fill starts as [MASK]. A *refinement pass*
predicts every masked position and *commits* some predictions: they become tokens, and
the next pass sees them as context. The strategy decides which are committed:

  fixed        LLaDA's sampler and the baseline: max_recursions passes per block, each
               committing an equal share of the masked tokens, the most confident first.
               Every pass is a full forward over every token.
  confidence,  MoR across passes. Each masked token gets a number of passes, its *recursion
  entropy,     depth*, from how hard it is: a score s = 1 - difficulty at or above
  gradient     confidence_high needs min_recursions, at or below confidence_low
               max_recursions, linear in between. With parallel_acceptance every token whose
               pass count reached its depth is committed in that pass, however many
               (Fast-dLLM's parallel decoding). Difficulty is read again every pass, so a token
               that became easy once its neighbours were committed goes at once. A floor keeps
               each block moving: every pass from min_recursions on also commits the fixed
               schedule's share of what remains, so no block needs more than max_recursions
               passes (without it, an all-hard block would repeat its first pass unchanged).

Compute saved is real (cache_committed=True, the default). A committed token runs no more
layers: its K/V stay in RefinementKV from the last pass that computed it, and later passes
run only the tokens that still need it (model.py's `active`). That is Fast-dLLM's
approximation (Wu et al. 2025): a token's K/V do not see what was committed after it was
last computed (bench.py --mode=diffusion measures the cost against cache_committed=False).
A token committed in pass p runs once more, in pass p + 1, so that its K/V say what it now
is. With skip_confident_tokens, a token whose score reached skip_threshold skips even that
pass: the K/V of the pass that predicted it stand in.
"""
import math
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from kv_cache import shares_first, from_grid, sdpa, to_grid

# -----------------------------------------------------------------------------
# Training: the forward (noising) process and the MDLM/LLaDA loss

T_MIN = 1e-3    # the smallest masking rate: the loss divides by t (LLaDA's eps)


def corrupt(x, mask_token, generator=None):
    """Mask clean tokens x [B, T] at a rate t per sequence: one uniform draw shifted by 0, 1/B, 2/B, ... (mod 1),
    MDLM's low-discrepancy sampler (a steadier loss). -> (x_t [B, T], masked [B, T] bool, t [B])."""
    B, T = x.shape
    t = (torch.rand(1, generator=generator) + torch.arange(B) / B) % 1.0
    t = T_MIN + (1 - T_MIN) * t                                        # in [T_MIN, 1)
    masked = (torch.rand(B, T, generator=generator) < t[:, None]).to(x.device)
    return torch.where(masked, mask_token, x), masked, t.to(x.device)


def diffusion_loss(logits, x, masked, t):
    """The module docstring's L: logits [B, T, V], x [B, T] clean, masked [B, T], t [B]."""
    ce = F.cross_entropy(logits[masked].float(), x[masked], reduction="none")   # (n_masked,)
    weight = (1.0 / t)[:, None].expand_as(masked)[masked]
    return (ce * weight).sum() / masked.numel()


def masked_diffusion_loss(model, x, mask_token, generator=None):
    """The loss of a batch of clean tokens x [B, T]; the mask id comes separately (model may be wrapped)."""
    x_t, masked, t = corrupt(x, mask_token, generator)
    logits, _ = model(x_t)
    return diffusion_loss(logits, x, masked, t)


# -----------------------------------------------------------------------------
# The refinement schedule: configuration and presets

STRATEGIES = ("confidence", "entropy", "gradient", "fixed")


@dataclass
class RefinementConfig:
    strategy: str = "confidence"        # confidence | entropy | gradient | fixed (the baseline)
    min_recursions: int = 1             # passes for an easy token (score >= confidence_high)
    max_recursions: int = 4             # passes for a hard token (score <= confidence_low); fixed: passes per block
    confidence_high: float = 0.9        # scores from here up are easy
    confidence_low: float = 0.5         # scores from here down are hard; linear in between
    skip_confident_tokens: bool = True  # a token whose score reaches skip_threshold is committed at once,
    skip_threshold: float = 0.95        # and needs no pass to refresh its K/V
    parallel_acceptance: bool = True    # commit every token whose depth is reached in that pass (Fast-dLLM);
                                        # False: only the schedule's share (and skipped tokens)
    batch_by_difficulty: bool = True    # one call per pass for the tokens of every row that still need a pass;
                                        # False: one call per row (same results, more, smaller calls)
    cache_committed: bool = True        # committed tokens stop computing (K/V cache); False: exact full passes
    block_length: int = 0               # fill left to right in blocks of this many positions (LLaDA's
                                        # semi-autoregressive sampling); 0 = all masked positions at once
    temperature: float = 0.0            # 0: commit the most likely token; > 0: sample at this temperature

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.min_recursions >= 1, f"min_recursions must be >= 1 (the pass that predicts a token), got "
                                       f"{self.min_recursions}")
        need(self.min_recursions <= self.max_recursions,
             f"min_recursions ({self.min_recursions}) is more than max_recursions ({self.max_recursions})")
        for name in ("confidence_high", "confidence_low", "skip_threshold"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, f"{name} must lie in [0, 1] (a probability-like score), got {value}")
        need(self.confidence_low < self.confidence_high,
             f"confidence_low ({self.confidence_low}) must be below confidence_high ({self.confidence_high})")
        need(self.block_length >= 0, f"block_length must be >= 0 (0 = one block), got {self.block_length}")
        need(self.temperature >= 0, f"temperature must be >= 0 (0 = most likely token), got {self.temperature}")

    @classmethod
    def preset(cls, name="balanced", **overrides):
        """A preset (PRESETS: balanced, max_speed, max_quality), then any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown RefinementConfig field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "balanced": {},                                                                # the defaults
    "max_speed": dict(max_recursions=2, skip_threshold=0.9, confidence_high=0.85),
    "max_quality": dict(max_recursions=8, skip_threshold=0.99, confidence_low=0.2),
}


# -----------------------------------------------------------------------------
# Attention across refinement passes: every position's K/V, kept between calls

class RefinementKV:
    """K/V of every position of a [B, T] window, per layer application, kept between forward calls (kv_cache.py's
    interface): the first call runs whole rows, a later one any subset (`run_only`); queries see all T (no mask)."""
    seq_len = 0        # the window starts at position 0

    def __init__(self, kv_mode="recursion"):
        self.kv_mode = kv_mode
        self.k, self.v = {}, {}    # (part, step, index) -> [B, Hkv, T, hd]

    def wants_kv(self, site):
        return not shares_first(self.kv_mode, site)

    def advance(self, depth):
        pass               # positions are fixed: nothing moves between calls

    def attend(self, site, q, k, v, active):
        step = 0 if self.kv_mode == "share_first" and site.part == "rec" else site.step
        key = (site.part, step, site.index)
        if k is not None:
            if key not in self.k:
                assert active.grid_index is None and active.K == active.T, "the first call must run whole rows"
                self.k[key] = k.new_zeros(active.B, k.shape[1], active.T, k.shape[2])
                self.v[key] = torch.zeros_like(self.k[key])
            self.k[key][active.row, :, active.pos] = k                     # each token at its own position
            self.v[key][active.row, :, active.pos] = v
        kg, vg = self.k[key], self.v[key]                                  # (B, Hkv, T, hd)
        if not active.all_rows:
            kg, vg = kg[active.rows], vg[active.rows]
        y = sdpa(to_grid(q, active).transpose(1, 2), kg, vg)               # (rows, H, K, hd): all T keys
        return from_grid(y.transpose(1, 2), active).flatten(1)


# -----------------------------------------------------------------------------
# The difficulty signals: probabilities p [..., V] -> difficulty in [0, 1] (0 = certain), one per strategy

DIFFICULTY = {
    "confidence": lambda p: 1 - p.amax(-1),                         # 1 - the top probability
    "fixed": lambda p: 1 - p.amax(-1),
    "entropy": lambda p: (torch.special.entr(p).sum(-1) / math.log(p.shape[-1])).clamp(0, 1),   # / log V: 0 to 1
    # |softmax(z) - onehot(argmax z)|: the norm of the gradient, with respect to the logits z, of the cross-entropy
    # that would train the token towards its own prediction (closed form, no backward pass). Unlike confidence it
    # grows when the rest of the mass sits on one rival: a two-way tie is harder than a long tail.
    "gradient": lambda p: (p - F.one_hot(p.argmax(-1), p.shape[-1])).norm(dim=-1).clamp(0, 1),
}


# -----------------------------------------------------------------------------
# The decoder

class AdaptiveRefiner:
    """Fills [MASK] positions by refinement passes (the module docstring). Statistics accumulate over calls
    until reset_stats()."""

    def __init__(self, config=None):
        self.config = config or RefinementConfig()
        self.difficulty_of = DIFFICULTY[self.config.strategy]    # the strategy's signal, chosen once
        self.reset_stats()

    # -- the difficulty signal -----------------------------------------------------
    def compute_confidence(self, logits):
        """logits [..., V] -> the top softmax probability [...]."""
        return logits.float().softmax(-1).amax(-1)

    def compute_difficulty(self, logits):
        """logits [..., V] -> difficulty in [0, 1] (0 = certain), by the strategy's signal (DIFFICULTY)."""
        return self.difficulty_of(logits.float().softmax(-1))

    def compute_recursion_depths(self, difficulty):
        """difficulty [...] -> passes each token needs [...] (long): the module docstring's linear map of
        s = 1 - difficulty, halves rounded up. fixed: max_recursions for every token."""
        c = self.config
        if c.strategy == "fixed":
            return torch.full_like(difficulty, c.max_recursions, dtype=torch.long)
        score = 1 - difficulty.double()
        frac = ((c.confidence_high - score) / (c.confidence_high - c.confidence_low)).clamp(0, 1)
        return torch.floor(c.min_recursions + frac * (c.max_recursions - c.min_recursions) + 0.5).long()

    # -- statistics ---------------------------------------------------------------
    def reset_stats(self):
        self.stats = dict(total_steps=0, tokens_processed=0, tokens_skipped=0, easy_tokens=0, medium_tokens=0,
                          hard_tokens=0, total_recursions=0, token_layer_ops=0, token_layer_ops_full=0, wall_s=0.0)
        self.depth_counts = torch.zeros(0, dtype=torch.long)   # [d] = tokens computed in d passes

    def get_stats(self):
        """A plain dict (configurator.write_stats_csv / write_prometheus). total_steps: forward calls;
        tokens_processed: positions filled; tokens_skipped: committed by the skip rule; easy/medium/hard: the
        first pass's score >= confidence_high / between / <= confidence_low; total_recursions: passes that
        computed a filled token, summed (K/V refresh included); token_layer_ops: rows fed to the layers (context
        included) times layer applications per token; token_layer_ops_full: the same for max_recursions full
        passes per block; compute_saved_pct: 1 - their ratio; depth_hist[d]: tokens computed in d passes."""
        s = dict(self.stats)
        n = max(1, s["tokens_processed"])
        s["mean_recursions_per_token"] = s["total_recursions"] / n
        s["compute_saved_pct"] = 100.0 * (1 - s["token_layer_ops"] / s["token_layer_ops_full"]) \
            if s["token_layer_ops_full"] else 0.0
        s["depth_hist"] = self.depth_counts.tolist()
        return s

    # -- refinement ---------------------------------------------------------------
    def check(self, model):
        """ValueError for a model this decoder cannot refine."""
        cfg = model.config
        if not cfg.bidirectional or cfg.mask_token < 0:
            raise ValueError("this is an autoregressive checkpoint (no [MASK] token): adaptive refinement needs a "
                             "masked-diffusion model (python train.py config/diffusion_tiny.py), or sample this "
                             "one without --diffusion")
        if cfg.mask_token != cfg.vocab_size - 1:
            raise ValueError(f"[MASK] must be the last id ({cfg.vocab_size - 1}, as train.py makes it), got "
                             f"{cfg.mask_token}")
        if model.router is not None:
            raise ValueError("adaptive refinement varies the passes per token; a model with a router (per-step "
                             "depth) is not supported: train the diffusion model with router='none'")

    @torch.no_grad()
    def apply_adaptive_refinement(self, model, x, return_logprobs=False):
        """Fill every [MASK] of x [B, T] (T <= block_size) in place, in blocks of block_length positions from the
        first masked one. -> x, and with return_logprobs the log-softmax [B, T, V-1] each filled token was
        committed from (zeros elsewhere)."""
        self.check(model)
        t0 = time.perf_counter()
        mask = model.config.mask_token
        masked = x == mask
        logprobs = x.new_zeros(*x.shape, mask, dtype=torch.float) if return_logprobs else None
        cols = masked.any(0).nonzero()
        if cols.numel():
            first, T = int(cols[0]), x.shape[1]
            step = self.config.block_length or T
            for lo in range(first, T, step):
                fill = masked.clone()
                fill[:, :lo] = False
                fill[:, lo + step:] = False
                if fill.any():
                    self._refine(model, x, fill, logprobs)
        self.stats["wall_s"] += time.perf_counter() - t0
        return (x, logprobs) if return_logprobs else x

    @torch.no_grad()
    def generate(self, model, prompt, max_new_tokens):
        """prompt [B, P] -> [B, P + max_new_tokens]: a masked continuation refined block by block, in the whole
        sequence while it fits in block_size (later blocks as [MASK]), then in the block_size positions ending
        at the block."""
        self.check(model)
        t0 = time.perf_counter()
        bs, mask = model.config.block_size, model.config.mask_token
        B, P = prompt.shape
        step = self.config.block_length or max_new_tokens
        if P + min(step, max_new_tokens) > bs:
            raise ValueError(f"the prompt ({P} tokens) plus one block ({min(step, max_new_tokens)}) exceed the "
                             f"model's context of {bs} (block_size): shorten the prompt or lower block_length")
        x = torch.cat((prompt, prompt.new_full((B, max_new_tokens), mask)), dim=1)
        total = P + max_new_tokens
        for lo in range(P, total, step):
            hi = min(lo + step, total)
            end = min(total, max(hi, bs))            # the window: block_size positions at most
            start = max(0, end - bs)
            window = x[:, start:end]                 # a view: refinement writes through it
            fill = torch.zeros_like(window, dtype=torch.bool)
            fill[:, lo - start:hi - start] = True
            self._refine(model, window, fill)
        self.stats["wall_s"] += time.perf_counter() - t0
        return x

    def _refine(self, model, x, fill, logprobs=None):
        """Fill the positions fill [B, T] of x (all [MASK]) in place: one block, pass by pass."""
        c, st = self.config, self.stats
        if not c.batch_by_difficulty and x.shape[0] > 1:        # one call per row
            for b in range(x.shape[0]):
                self._refine(model, x[b:b + 1], fill[b:b + 1], None if logprobs is None else logprobs[b:b + 1])
            return
        B, T = x.shape
        dev = x.device
        n_layers = model.plan.full_depth_layers                 # layer applications per token
        todo = fill.clone()                                     # still [MASK]
        write = torch.zeros_like(fill)                          # committed last pass, K/V still from [MASK]
        computed = torch.zeros(B, T, dtype=torch.long, device=dev)   # passes that computed each position
        passes = torch.zeros(B, dtype=torch.long, device=dev)        # each row's pass counter
        n_fill = fill.sum(1)
        kv = RefinementKV(model.config.kv_mode) if c.cache_committed else None
        st["tokens_processed"] += int(n_fill.sum())
        st["token_layer_ops_full"] += c.max_recursions * int((n_fill > 0).sum()) * T * n_layers
        first = True
        while todo.any():
            rows = todo.any(1)
            # who runs: whole rows still working (exact passes, the cache's first), else the tokens still
            # masked and those whose K/V need their new id
            runs = rows[:, None].expand(B, T) if kv is None or first else (todo | write) & rows[:, None]
            if kv is None:
                logits = model(x[rows])[0][todo[rows]]                          # (M, V)
            else:
                logits = model(x, kv=kv, run_only=None if bool(runs.all()) else runs)[0][todo]
            logits = logits[:, :-1]                                             # [MASK] is never predicted
            st["total_steps"] += 1
            st["token_layer_ops"] += int(runs.sum()) * n_layers
            computed += runs
            passes += rows
            difficulty, confidence = self._signals(logits, todo)
            if first:
                self._count_first_look(todo, 1 - difficulty)
            first = False
            due, skip = self._due(todo, passes, difficulty, confidence)
            self._commit(x, logits, todo, due, logprobs)
            todo = todo & ~due
            write = due & ~skip
            st["tokens_skipped"] += int((due & skip).sum())
        self._count_passes(computed[fill].cpu())

    def _signals(self, logits, todo):
        """The signals of the masked tokens (logits (M, V-1)), laid out [B, T]: difficulty (1 elsewhere) and
        confidence (the top probability; -1 elsewhere, so that the schedule ranks the masked tokens first)."""
        difficulty = torch.ones(todo.shape, device=todo.device)
        difficulty[todo] = self.compute_difficulty(logits)
        confidence = torch.full(todo.shape, -1.0, device=todo.device)
        confidence[todo] = self.compute_confidence(logits)
        return difficulty, confidence

    def _count_first_look(self, todo, score):
        """easy / medium / hard by the first pass's score."""
        c, st = self.config, self.stats
        easy, hard = todo & (score >= c.confidence_high), todo & (score <= c.confidence_low)
        st["easy_tokens"] += int(easy.sum())
        st["hard_tokens"] += int(hard.sum())
        st["medium_tokens"] += int((todo & ~easy & ~hard).sum())

    def _due(self, todo, passes, difficulty, confidence):
        """Who is committed in this pass -> (due, skip) [B, T]: the schedule's share of what remains, the most
        confident first (adaptive strategies: from min_recursions on), and for adaptive strategies the skipped
        tokens and, with parallel_acceptance, every token whose passes reached its depth."""
        c = self.config
        left = c.max_recursions - passes + 1                              # passes left, this one included
        share = (todo.sum(1) + left - 1) // left
        adaptive = c.strategy != "fixed"
        if adaptive:
            share = torch.where(passes >= c.min_recursions, share, 0)
        rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        due = todo & (rank < share[:, None])
        skip = torch.zeros_like(todo)
        if adaptive and c.skip_confident_tokens:
            skip = todo & (1 - difficulty >= c.skip_threshold)
        if adaptive and c.parallel_acceptance:
            depth = torch.full(todo.shape, c.max_recursions, dtype=torch.long, device=todo.device)
            depth[todo] = self.compute_recursion_depths(difficulty[todo]).to(todo.device)
            due = due | todo & (depth <= passes[:, None])
        return due | skip, skip

    def _commit(self, x, logits, todo, due, logprobs):
        """Write the due tokens' predictions into x (and, with logprobs, the distribution each came from)."""
        c = self.config
        if c.temperature == 0:
            pred = logits.argmax(-1)
        else:
            pred = torch.multinomial((logits.float() / c.temperature).softmax(-1), 1)[:, 0]
        chosen = torch.zeros_like(x)
        chosen[todo] = pred
        if logprobs is not None:
            lp = torch.zeros_like(logprobs)
            lp[todo] = logits.float().log_softmax(-1)
            logprobs[due] = lp[due]
        x[due] = chosen[due]

    def _count_passes(self, done):
        """done: the passes that computed each filled token -> total_recursions and the depth histogram."""
        self.stats["total_recursions"] += int(done.sum())
        counts = torch.bincount(done, minlength=len(self.depth_counts))
        self.depth_counts = F.pad(self.depth_counts, (0, len(counts) - len(self.depth_counts))) + counts


def describe_stats(s):
    """get_stats() as a few lines for a terminal (sample.py, bench.py)."""
    hist = " ".join(f"{d}:{n}" for d, n in enumerate(s["depth_hist"]) if n)
    return (f"\nrefinement: {s['tokens_processed']} tokens filled in {s['total_steps']} passes, {s['wall_s']:.2f} s; "
            f"mean recursions per token {s['mean_recursions_per_token']:.2f}\n"
            f"  token-layer ops {s['token_layer_ops']:,} of {s['token_layer_ops_full']:,} for max_recursions full "
            f"passes (compute saved {s['compute_saved_pct']:.1f}%)\n"
            f"  easy {s['easy_tokens']}, medium {s['medium_tokens']}, hard {s['hard_tokens']} tokens; "
            f"skipped {s['tokens_skipped']}; tokens by passes computed {hist}")


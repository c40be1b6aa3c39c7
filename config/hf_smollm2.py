# Routers for the built-in SmolLM2-135M-Instruct (30 layers), base frozen (tune.py): the longer recipe behind the
# tables below; tune.py's defaults are the short one (python tune.py --hf smollm2-135m --router=<kind>). One run a kind:
#   python tune.py config/hf_smollm2.py --router=ffn             # ~25 min on 2 CPU cores, + ~5.5 min of answers the
#                                                                # first time (skip, expert_choice, token_choice alike)
#   python sample.py --hf smollm2-135m --router ffn --prompt="Explain mixture of recursions simply."
#   python bench.py --mode=ppl --hf=smollm2-135m --dataset=pydoc       # quality, with every routers file it finds
# The tuning text is the model's own chat answers to 256 prompts (self-distillation; the first run makes them and
# keeps them in the model's cache folder), so the quality table's held-out text -- the Python reference (dataset
# 'pydoc') and the Shakespeare validation plays -- is another domain. The routers go to routers-<kind>.pt in the
# model's cache folder (~/.cache/nanomor/smollm2-135m), where sample.py and bench.py find them; --out_dir=<dir>:
# <dir>/routers.pt instead.
#
# tune.py's defaults (128 answers, 80 steps of 4 x 256 tokens), measured once on the 2-core CPU shared with other jobs
# (one thread, 2026-12-03): python tune.py --hf smollm2-135m --router expert_choice took 18.2 min, 3.2 of them making
# the answers; its straight-through half shut every gate (mean hard weight 0.002, tune.py warns; --hard_gate_frac=0
# keeps 0.958: held-out ppl 13.91 vs 8.78 at full depth, 97.4% of layer calls). At --keep_ratio 0.6 (60% of the tokens
# that reach a group go on) "Explain mixture of recursions simply." ran 17.6% of the layer calls and came out broken.
# --router skip (21 min on the answers made, a heavier load): ppl 13.21 at 83.7% of layer calls; that prompt at bias 0:
# fluent, 16.3% of the layer calls saved.
#
# Measured on the 2-core AMD EPYC CPU (float32, torch 2.13, 2026-11-27): each row tuned with
#   python tune.py config/hf_smollm2.py <flags> --out_dir=out-smollm2-<name>
# then perplexity on 16 held-out windows of 256 tokens, every method's threshold bisected to the static drop's layer
# calls (~11 min a depth with six router files):
#   python bench.py --mode=ppl --hf=smollm2-135m --dataset=pydoc,shakespeare --block_size=256 --batch_size=4 \
#       --ppl_windows=16 --calib_windows=16 --ppl_depths="(0.8,0.7)" --routers=out-smollm2-<name>/routers.pt,...
# | flags (full depth: pydoc 11.65, Shakespeare 39.51)                          | pydoc 80% / 70% | Shakespeare 80% / 70% |
# | static drop (no routers: ShortGPT's lowest-influence layers)                | 35.02 / 53.84   | 95.36 / 179.6         |
# | --router=ffn                                                                | 42.58 / 391.0   | 92.17 / 274.1         |
# | --router=ffn --stand_in_rank=64 (FlexiDepth)                                | 32.13 / 96.29   | 85.99 / 175.3         |
# | --router=skip                                                               | 33.73 / 74.53   | 76.63 / 141.8         |
# | --router=skip --hard_gate_frac=0 (soft gates only)                          | 32.50 / 77.65   | 78.53 / 122.6         |
# | --router=skip --stand_in_rank=64                                            | 30.40 / 61.10   | 69.26 / 108.6         |
# | --router=skip --init_gates=influence --target_active_ratio=0.68             | 29.80 / 67.28   | 67.74 / 137.1         |
# | the same + --stand_in_rank=64 --penalty_warmup_iters=0 (the best, below)    | 24.70 / 41.34   | 55.58 / 85.74         |
# | the best without stand-ins, --router_group=2 (14 two-layer units)           | 32.39 / 79.37   | 64.54 / 131.6         |
# | --router=expert_choice                                                      | 449.9 / 2,792   | 5,188 / 22,029        |
# | --router=token_choice --max_iters=50                                        | 403.4 / 3,010   | 337.8 / 3,201         |
# 2026-12-04 (the README's 90/80% table, one thread, 3 runs sharing the 2 cores): the best row with --self_distill=128
# took 36.9 min (pydoc 16.04 / 24.12 at 90 / 80%); + --heal_rank=8 38.4 min (16.91 / 26.26: healing at rank 8 fits the
# 128 answers, not the held-out text); --heal_rank=2 --self_distill=256 34.8 min (16.07 / 23.75; Shakespeare 45.10 /
# 57.59); --router expert_choice (soft gates, 2 tail layers) 29.1 min (81.85 / 631.5). The healing run with
# --dataset=pydoc (answers to prompts of pydoc's training words, 42.4 min): pydoc 15.47 / 21.73, Shakespeare 47.65 /
# 61.71 (below the oracle at 80% on both texts; README's table).
# Early exit (expert_choice, token_choice: a stopped token skips the last layers too) needs more than 2 tail layers on
# this model: its last layers turn a state into a prediction. 2026-12-04, one thread, the same bench with
# --ppl_stop_tails="(2,8)" --ppl_calm=False (40 min; 90 / 80% on pydoc, Shakespeare):
#   --router=expert_choice --tail_layers=8 --target_active_ratio=0.7 --dataset=pydoc (21.4 min): 21.64 / 43.19, 62.60 /
#   93.22 (README; tail 2: 81.85 / 631.5). Its oracle (bench.OracleStop): 17.97 / 41.56 with 8 tail layers, 24.07 /
#   282.6 with 2. + --heal_rank=2 (22.0 min): 21.12 / 42.44, 71.55 / 120.3. MoR's own top-k training (each group
#   keeps exactly its capacity of the batch's tokens, straight-through, an auxiliary BCE; tried and removed): 131.4 /
#   205.6 with 8 tail layers, 229.4 / 7,310 with 2. Skipping, with the last layers kept, is what works.
# Speed (1 thread, 2026-12-07, medians of 3 interleaved runs, prefill included, 64 greedy tokens on the chat prompts;
# the best row retuned in 18.8 min: held-out ppl 12.38 vs 8.78 at 70.6% of layer calls), the README's command
#   python bench.py --mode=spec --hf=smollm2-135m --routers=<best>,<drafter> --decoders='no_skip,routed,prompt \
#       lookup,drafter' --graphs=on --speculative=3 --lookup=3 --new_tokens=64 --repeats=3 --threads=1
# --no_skip compiled 42.3 tok/s; the best routers at bias 0 (69.6% of layer calls) compiled 51.5 (1.22x; eager 30.0).
# Again 2026-12-07 on an AVX-512 CPU, --speculative=1, after the full-depth step also skipped the torch.nn guards:
# --no_skip compiled 39.1 tok/s, the best routers compiled 44.0 (1.13x; 1.19x in the run before).
# Batch-1 compiled decode runs each layer's gate inside the layer before's compiled call (hf_wrap._routed_one), ~30
# compiled calls a step without guard checks on torch.nn modules; the LM head (21% of a token's bytes) always runs.
hf = "smollm2-135m"
router = "ffn"
# the text: 256 answers, made as config/hf_spec_draft.py makes its (128 new tokens each, temperature 0.7, 16 at a
# time); the tables were measured on that run's, read back as text (--self_distill=0
# --dataset=out-spec-draft/self_distill.txt: the same words, their last tenth held out instead of the first)
self_distill = 256

# tune.py's defaults for the rest: 4 windows * 256 tokens = 1,024 tokens per step (~11 s on 2 cores), the KL to the
# full model, a gate before every layer 1..28 (ffn / skip) or R = 7 groups of 4 after 2 base layers (expert / token
# choice), the budget 70% of the routed units' work (ffn: of their MLPs), penalty_weight 2, learning rate 5e-3
max_iters = 100
eval_interval = 50
device = "cpu"

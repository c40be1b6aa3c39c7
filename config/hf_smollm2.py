# Routers for the built-in SmolLM2-135M-Instruct (30 layers), base frozen (tune.py). One run per kind:
#   python tune.py config/hf_spec_draft.py                       # 0. once: the model's own answers (self_distill.txt)
#   python tune.py config/hf_smollm2.py --router=ffn             # 1. ~25 min on 2 CPU cores (skip, expert_choice,
#                                                                #    token_choice alike, into out-smollm2-<kind>)
#   python sample.py --routers=out-smollm2-ffn/routers.pt --prompt="Explain mixture of recursions simply."
#   python bench.py --mode=ppl --hf=smollm2-135m --routers=out-smollm2-ffn/routers.pt --dataset=pydoc  # quality
# The tuning text is the model's own chat answers (self-distillation, written by step 0), so the quality table's
# held-out text -- the Python reference (dataset 'pydoc') and the Shakespeare validation plays -- is another domain.
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
# Early exit (expert_choice, token_choice: a stopped token skips the last layers too) fails on this model: its last
# layers turn a state into a prediction. Skipping, with the last layers kept, is what works.
# Speed (2 threads, load_hf's oneDNN kernels, 2026-11-28, two interleaved runs of
#   python sample.py --hf smollm2-135m --routers out-smollm2-skip-static-standin/routers.pt --threshold <bias> \
#       --max_new_tokens 64 --prompt "Explain mixture of recursions simply."):
# --no_skip 40.2 / 41.0 tok/s; the best routers at the 80% bias (-0.1465) 37.9 / 37.8 (0.93x), at the 70% bias
# (0.1465) 43.3 / 43.8 (1.07x), the text looping. The routing costs ~2.4 ms of a ~27 ms step (29 gate MLPs, masks,
# repacking): on this CPU no skip router gives fluent text faster than full depth; speculative decoding
# (config/hf_spec_drafter.py) gives the exact text faster.
hf = "smollm2-135m"
dataset = "out-spec-draft/self_distill.txt"
router = "ffn"
out_dir = "out-smollm2-ffn"     # set with --out_dir when --router changes
loss = "kl"                     # match the full model's distribution: keep its behaviour, not fit this text

# 4 windows * 256 tokens = 1,024 tokens per step: the frozen base runs forward twice (the full model for the KL
# target, the routed one with gradients for the gates): ~11 s per step on 2 cores
batch_size = 4
block_size = 256
max_iters = 100
eval_interval = 50
eval_iters = 4                  # 16 held-out windows of the answers
log_interval = 10
calib_windows = 16

# ffn / skip: a gate before every layer 1..28 (layer 0 and 29 always run); expert / token choice: R groups
router_start = 1
router_stop = -1
router_group = 1
router_mlp_hidden = 64
R = 7                           # 28 layers after base_layers = 2: groups of 4
base_layers = 2

# the budget: 70% of the routed units' work (ffn: of their MLPs); the bias search then sets 90 / 80 / 70%
target_active_ratio = 0.7
penalty_weight = 2.0
penalty_warmup_iters = 10
gate_entropy_weight = 0.1
hard_gate_frac = 0.5
learning_rate = 5e-3
min_lr = 5e-4
warmup_iters = 10
device = "cpu"

# Routers for the built-in SmolLM2-135M-Instruct (30 layers), base frozen (tune.py). One run per kind:
#   python tune.py config/hf_spec_draft.py                       # 0. once: the model's own answers (self_distill.txt)
#   python tune.py config/hf_smollm2.py --router=ffn             # 1. ~25 min on 2 CPU cores (skip, expert_choice,
#                                                                #    token_choice alike, into out-smollm2-<kind>)
#   python sample.py --routers=out-smollm2-ffn/routers.pt --prompt="Explain mixture of recursions simply."
#   python bench.py --mode=ppl --hf=smollm2-135m --routers=out-smollm2-ffn/routers.pt --dataset=pydoc  # quality
# The best skip recipe measured (README: beats static dropping at 90/80/70% on held-out text):
#   python tune.py config/hf_smollm2.py --router=skip --init_gates=influence --target_active_ratio=0.68 \
#       --stand_in_rank=64 --penalty_warmup_iters=0 --out_dir=out-smollm2-skip-static-standin
# The tuning text is the model's own chat answers (self-distillation, written by step 0), so the quality table's
# held-out text -- the Python reference (dataset 'pydoc') and the Shakespeare validation plays -- is another domain.
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

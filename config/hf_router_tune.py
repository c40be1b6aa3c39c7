# Router tuning for a pretrained Llama-family model, every base weight frozen (tune.py):
#   python train.py config/dense_cpu.py                                    # 1. a dense 12-layer model (~15 min CPU)
#   python sample.py --out_dir=out-dense-cpu --export_hf=out-dense-cpu/hf  # 2. as a transformers Llama folder
#   python tune.py config/hf_router_tune.py                                # 3. this: routers + exit gates (~5 min)
#   python sample.py --routers=out-hf-router-tune/routers.pt --prompt=ROMEO: --return_depth_trace
#   python bench.py --mode=ppl --hf=out-dense-cpu/hf --routers=out-hf-router-tune/routers.pt   # the quality table
# A real model: --hf=smollm2-135m (built in), or hf='Qwen/Qwen2.5-0.5B' (or a local folder) on a GPU with
# device='cuda' (the base loads in bf16), block_size=512, batch_size=8, max_iters=1000, and dataset='your.txt' if
# Shakespeare is not your domain.
hf = "out-dense-cpu/hf"
out_dir = "out-hf-router-tune"  # routers.pt lands here
dataset = "shakespeare"         # encoded with the model's own tokenizer; or a path to a UTF-8 .txt file

# 16 windows * 128 tokens = 2,048 tokens per step; the frozen base runs forward and backward (for the gates'
# gradients) but computes no weight gradients, so a step costs ~2/3 of a training step of the base
batch_size = 16
block_size = 128
max_iters = 300
eval_interval = 100
eval_iters = 4                  # held-out windows = eval_iters * batch_size (the val plays, never tuned on)
log_interval = 25
calib_windows = 32              # train-split windows: keep_ratio cutoffs and the target search are measured here

# one skip gate before every layer from 1 to 10: layer 0 and the last layer always run
router_pattern = "every"
router_start = 1
router_stop = -1
router_group = 1
router_mlp_hidden = 64          # 192 -> 64 -> 1 per gate: ~12k parameters each

# loss = LM + penalty_weight * max(mean_gate - target_active_ratio, 0) + entropy (pushing gates to 0/1).
# 0.6 of the 10 routed layers = 8 of 12 layers per token (a layer-call ratio of ~0.67) if the gates were hard
target_active_ratio = 0.6
penalty_weight = 2.0
penalty_warmup_iters = 25       # first let the gates see the LM loss alone
# Soft gates alone settle at partial strength for every token (g ~ 0.6 everywhere), a model that hard routing
# at inference does not reproduce. Measured at 8 of 12 layers (README): soft only 8.05 ppl, + entropy 7.40,
# + straight-through for the last half 6.58, both 6.52, static layer dropping 7.11.
gate_entropy_weight = 0.1
hard_gate_frac = 0.5            # the last half of phase 1 runs 0/1 gates forward, soft gradients backward

learning_rate = 2e-3            # only ~120k router parameters: a high rate is fine
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.0
grad_clip = 1.0

# phase 2: exit gates at the inputs of layers 4, 6, 8 and 10 (CALM-style learned confidence), routers frozen
exit_layers = (4, 6, 8, 10)
exit_iters = 150
exit_threshold = 0.9

# then: bisection on the bias until the layer calls are 1/1.43 = 70% of full depth on calibration text
target_speedup = 1.43
device = "cpu"

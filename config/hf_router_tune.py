# Router tuning for a pretrained Llama-family model, every base weight frozen (tune.py): skip gates on the Shakespeare
# text itself, 16 x 128-token windows, 300 steps, target_active_ratio 0.6 (tune.py's defaults are SmolLM2-135M's):
#   python train.py config/dense_cpu.py                                    # 1. a dense 12-layer model (~15 min CPU)
#   python sample.py --out_dir=out-dense-cpu --export_hf=out-dense-cpu/hf  # 2. as a transformers Llama folder
#   python tune.py config/hf_router_tune.py                                # 3. this: routers + exit gates (~5 min)
#   python sample.py --routers=out-hf-router-tune/routers.pt --prompt=ROMEO: --return_depth_trace
#   python bench.py --mode=ppl --hf=out-dense-cpu/hf --routers=out-hf-router-tune/routers.pt   # the quality table
# A real model: --hf=smollm2-135m (built in: tune.py's defaults are its recipe), or hf='Qwen/Qwen2.5-0.5B' (or a
# local folder) on a GPU with device='cuda' (the base loads in bf16), block_size=512, batch_size=8, max_iters=1000,
# and dataset='your.txt' if Shakespeare is not your domain.
hf = "out-dense-cpu/hf"
out_dir = "out-hf-router-tune"  # routers.pt lands here
self_distill = 0                # the text: Shakespeare's own (dataset), not the model's answers
batch_size = 16
block_size = 128
max_iters = 300
eval_interval = 100
log_interval = 25
calib_windows = 32
target_active_ratio = 0.6
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20

# one skip gate before every layer from 1 to 10 (layer 0 and the last layer always run), ~12k parameters each.
# loss = LM + penalty_weight * max(mean_gate - target_active_ratio, 0) + entropy (pushing gates to 0/1):
# 0.6 of the 10 routed layers = 8 of 12 layers per token (a layer-call ratio of ~0.67) if the gates were hard
penalty_weight = 2.0
penalty_warmup_iters = 25       # first let the gates see the LM loss alone
# Soft gates alone settle at partial strength for every token (g ~ 0.6 everywhere), a model that hard routing at
# inference does not reproduce; the defaults gate_entropy_weight=0.1 and hard_gate_frac=0.5 (the last half runs 0/1
# gates forward, soft gradients backward) fix that. Measured at 8 of 12 layers on the 2-core CPU (2026-11-26, an
# earlier version of the adapter and of the tuning script; base `python train.py config/dense_cpu.py --n_embd=128
# --max_iters=800 --out_dir=out-dense-abl`, routers with --target_active_ratio=0.64 --target_speedup=0
# --exit_iters=0, then `python bench.py --mode=ppl --hf=out-dense-abl/hf --ppl_depths=0.7 --routers=...`, 128
# held-out windows of 128 characters), perplexity: full depth 5.428, static layer dropping 7.114, soft gates only
# (--gate_entropy_weight=0 --hard_gate_frac=0) 8.052, + entropy 7.404, + straight-through 6.578, both 6.515.

# phase 2: exit gates at the inputs of layers 4, 6, 8 and 10 (CALM-style learned confidence), routers frozen
exit_layers = (4, 6, 8, 10)
exit_iters = 150

# then: bisection on the bias until the layer calls are 1/1.43 = 70% of full depth on calibration text
target_speedup = 1.43
device = "cpu"

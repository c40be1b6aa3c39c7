# A speculative-decoding draft for the built-in SmolLM2-135M (tune.py), base frozen:
#   python tune.py config/hf_spec_draft.py                       # ~15 min on 2 CPU cores (half of it: the answers)
#   python sample.py --routers=out-spec-draft/routers.pt --speculative=4 --prompt="Explain mixture of recursions simply."
# An exit head at the input of layer 20 of 30 (hf_wrap.ExitHead: a rank-128 residual adapter, the model's final norm
# copied, and the rows of its LM head for the 8,192 most frequent tokens of the tuning text), trained by KL divergence
# to the final layer's distribution. The layer-10 head, on the text this run saves:
#   python tune.py config/hf_spec_draft.py --self_distill=0 --dataset=out-spec-draft/self_distill.txt \
#       --exit_head_layer=10 --out_dir=out-spec-exit10
# Measured on the 2-core AMD EPYC CPU: the answers took 5.5 min, then per layer 1.5 min of base states and 2 min of
# head training. On 3,456 held-out tokens the head's argmax is the full model's:
#   layer 10: 5.7% untrained (the model's own head there), 41.3% trained;  layer 20: 15.8%, 49.7%.
# Decoding at batch 1, adaptive K, against transformers generate (2 threads, load_hf's oneDNN kernels, 2026-11-28):
# layer 10 0.82x (K=3: the README's speculative table), layer 20 0.71x (K=4, in one run of
#   python bench.py --mode=hf --hf=smollm2-135m --routers=out-spec-exit10/routers.pt,out-spec-draft/routers.pt,\
#       out-smollm2-skip-static-standin/routers.pt --threshold=0.1465 --speculative=4 --lookup=3 --new_tokens=64 \
#       --decode_batches=[1,4]
# where the skip routers of config/hf_smollm2.py, 62% of layer calls, drafted at 0.59x). An exit head pays for the
# layers below it at every draft; config/hf_spec_drafter.py's drafter runs none and is faster.
hf = "smollm2-135m"
out_dir = "out-spec-draft"
exit_head_layer = 20
exit_head_rank = 128
draft_vocab = 8192
draft_windows = 256             # 256 windows * 128 tokens = 32,768 tokens of base states, computed once (150 MB)

# the text: the model's own answers (self-distillation) to 256 chat prompts like "Explain <a word> simply.", each
# word from the Shakespeare training plays; 128 new tokens each, the first tenth of the answers held out. They land in
# out_dir: as token ids (self_distill-<settings>.npz, which a rerun reads instead of answering again) and as text
# (self_distill.txt, for another run's --self_distill=0 --dataset=out-spec-draft/self_distill.txt)
self_distill = 256
self_distill_tokens = 128

# 300 steps of 16 * 128 = 2,048 token states each (the base never runs in a step: ~0.5 s on the CPU)
batch_size = 16
block_size = 128
max_iters = 300
eval_iters = 2                  # held-out windows = eval_iters * batch_size
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
device = "cpu"

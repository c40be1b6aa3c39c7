# A speculative-decoding drafter for the built-in SmolLM2-135M (tune.py), base frozen:
#   python tune.py config/hf_spec_drafter.py            # ~20 min on 2 CPU cores (8 of them: the answers)
#   python sample.py --routers=out-spec-drafter-greedy/routers.pt --speculative=4 --lookup=3 \
#       --prompt="Explain photosynthesis simply."
# speculative.Drafter: from the full model's final state and the token it chose, a small MLP steps a state forward and the
# LM head's rows for the most frequent tokens of the tuning text give the next draft; trained by KL divergence to the
# full model's own distributions, drafter_steps tokens in a row. No layer of the model runs to draft.
# Measured on the 2-core AMD EPYC CPU: the answers took 8.2 min, the base states 1.6 min, the 400 steps ~11 min. On
# the held-out tenth, its first 1 / 2 / 3 drafts in a row are the full model's 51.0% / 29.6% / 20.1% (tuning's last
# line); decoding the bench prompts, its first draft is kept ~26-32% of the time, and adaptive K settles at 1.
# Rerun 2026-12-07 (one thread, 21.4 min with the answers made): 50.9% / 29.8% / 20.0%. Decoding (README's
# speculative table, 1 thread, compiled steps at ~the bandwidth): behind prompt lookup, 1.04x compiled full depth;
# alone 0.99x. A verify pass of 2 tokens costs 1.14 steps, and the first draft is kept ~27% on the bench prompts.
# On an AVX-512 CPU (2-token verify 1.06 steps), adaptive from K=1 (--speculative=1): prompt lookup else it
# 1.06-1.14x compiled full depth, alone 1.02-1.05x. Retrained on answers to pydoc words' prompts
# (--dataset=pydoc, 32.7 min): held out 48.6% / 27.1% / 17.6%, alone 1.04x in the same run: no better.
# Plain text as well, on the answers this run saves (held out 49.0% / 27.6% / 17.2%):
#   python tune.py config/hf_spec_drafter.py --self_distill=0 --dataset=out-spec-drafter-greedy/self_distill.txt \
#       --drafter_text=pydoc --out_dir=out-spec-drafter-pydoc
# gave no decoding gain (2026-11-28, 2 threads, oneDNN kernels, batch 1, adaptive: 1.08x generate against 1.09x for
# the greedy-only drafter, within the runs' spread; prompt lookup else it 1.25x) in one run of
#   python bench.py --mode=hf --hf=smollm2-135m --routers=out-spec-drafter-pydoc/routers.pt,\
#       out-spec-drafter-greedy/routers.pt --speculative=3 --lookup=3 --new_tokens=64 --decode_batches=[1,4]
hf = "smollm2-135m"
out_dir = "out-spec-drafter-greedy"   # trained on greedy answers (below)
drafter = True
drafter_hidden = 512            # 885,312 trainable parameters
drafter_steps = 3
draft_vocab = 8192              # the answers below hold ~7,400 distinct tokens: all of them
draft_windows = 2048            # every window the answers fill (~1,000 of 128 tokens)

# the text: the model's own GREEDY answers (what greedy speculative decoding asks it to draft) to 1,024 chat prompts
# like "Explain <a word> simply.", 128 new tokens each; the last tenth held out
self_distill = 1024
self_distill_tokens = 128
self_distill_temperature = 0.0

batch_size = 16                 # answers generated 16 at a time; a step: 16 * 128 = 2,048 start positions, 3 drafts
block_size = 128
max_iters = 400                 # ~1.6 s a step on the CPU
eval_iters = 2                  # held-out windows = eval_iters * batch_size
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
device = "cpu"

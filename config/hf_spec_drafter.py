# A speculative-decoding drafter for the built-in SmolLM2-135M (tune.py), base frozen:
#   python tune.py config/hf_spec_drafter.py            # ~? min on 2 CPU cores (the answers: ~5.5 of them)
#   python sample.py --routers=out-spec-drafter/routers.pt --speculative=4 --prompt="Explain mixture of recursions simply."
# router.Drafter: from the full model's final state and the token it chose, a small MLP steps a state forward and the
# rows of the LM head for the 8,192 most frequent tokens of the tuning text give the next draft; trained by KL
# divergence to the full model's own distributions, drafter_steps tokens in a row. No layer of the model runs to
# draft. On the answers hf_spec_draft.py already wrote, skip generating them again:
#   python tune.py config/hf_spec_drafter.py --self_distill=0 --dataset=out-spec-draft/self_distill.txt
hf = "smollm2-135m"
out_dir = "out-spec-drafter"
drafter = True
drafter_hidden = 512
drafter_steps = 3
exit_head_vocab = 8192
exit_head_windows = 512         # every window the text has (the 256 answers: ~250 of 128 tokens)

# the text: the model's own answers to 256 chat prompts like "Explain <a word> simply." (hf_spec_draft.py's)
self_distill = 256
self_distill_tokens = 128

batch_size = 8                  # 8 * 128 = 1,024 start positions a step, 3 drafts each
block_size = 128
max_iters = 400
eval_iters = 2                  # held-out windows = eval_iters * batch_size
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
device = "cpu"

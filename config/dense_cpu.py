# A dense (vanilla) 12-layer Llama-style model on Shakespeare characters: vanilla_tiny.py made deeper and wider,
# sized to train on a 2-core CPU in about 10-15 minutes. It is the base model for router tuning
# (config/hf_router_tune.py): deep enough that depth matters (12 layers to skip or drop), and exported to a
# transformers Llama folder with
#   python sample.py --out_dir=out-dense-cpu --export_hf=out-dense-cpu/hf
# config/dense_gpu.py is the same recipe, larger, for a GPU.
exec(open("config/vanilla_tiny.py").read())
out_dir = "out-dense-cpu"

# 16 sequences * 128 characters = 2,048 tokens per iteration; 1,400 iterations = 2.9M tokens (~0.6 s each)
block_size = 128
max_iters = 1400
eval_interval = 350

# 12 layers * (4 * 192^2 attention + 3 * 192 * 512 MLP) = 4.8M parameters in the layers (head size 48)
n_layer = 12
n_embd = 192

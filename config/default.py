# GPT-2 small (124M parameters) on FineWeb-Edu's 10B-token sample, for one node of 8 GPUs:
#   python prepare.py --input hf://datasets/HuggingFaceFW/fineweb-edu --hf_config sample-10BT \
#       --tokenizer gpt2 --val_fraction 0.005   # -> data/fineweb-edu: ~10B tokens, ~20 GB of uint16
#   torchrun --standalone --nproc_per_node=8 train.py config/default.py
# Fewer GPUs work too: gradient_accumulation_steps is the total over all processes,
# so the tokens per step stay the same (it must be a multiple of the process count).
out_dir = "out-gpt2"
dataset = "fineweb-edu"

# 12 batch * 1024 block * 40 accumulation steps = 491,520 tokens per step (~0.5M, as GPT-2/3 small)
# with 8 GPUs: 5 micro-steps each
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True

# 20,000 steps * 491,520 tokens = ~9.8B tokens: about one pass over the sample
learning_rate = 6e-4
max_iters = 20_000
lr_decay_iters = 20_000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10

compile = True
dtype = "auto"  # bf16 on A100/H100, fp16 + GradScaler on older GPUs

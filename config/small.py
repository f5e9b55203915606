# A character-level GPT on tiny shakespeare, tuned for a 2-core CPU: val loss <= 1.88 within
# 60 s and ~1.57 after ~260 s on this project's 2-core Xeon (README, "Time to quality").
#   python prepare.py && python train.py config/small.py
out_dir = "out-small"
dataset = "shakespeare_char"

# 0.80M parameters. Head size 64 (2 heads of 64, not nanoGPT's 4 of 32): the same FLOPs run
# faster on a CPU, and the loss per step is no worse.
n_layer = 4
n_head = 2
n_embd = 128
block_size = 64
batch_size = 16  # 16 x 64 = 1,024 tokens per step
dropout = 0.0  # 8M tokens seen in 300 s, ~8 epochs: not yet over-fitting

# A higher peak LR than nanoGPT's baby GPT (1e-3): at this size 2.5e-3 learns faster and stays stable.
learning_rate = 2.5e-3
max_iters = 9000  # ~29 ms/iter here: ~260 s with evaluations, room under 300 s on a slow day
lr_decay_iters = 9000  # = max_iters: decay all the way to min_lr
min_lr = 2.5e-4  # learning_rate / 10
warmup_iters = 50
beta2 = 0.99  # few tokens per step: a longer average of squared gradients

# "auto": bf16 autocast on CPUs with AVX512-BF16/AMX (here 1.26x faster steps than fp32, the same
# loss per step; attention stays fp32 at this block_size, see gpt.attention), fp32 on other CPUs.
dtype = "auto"

eval_interval = 250
eval_iters = 20
log_interval = 100

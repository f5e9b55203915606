# A character-level GPT on tiny shakespeare, sized for a laptop CPU: it trains for 5 minutes on
# any machine (time_budget_s) and reaches val loss ~1.50 on a 2-core AVX512-BF16 VM, ~1.54 capped
# to AVX2 (BENCHMARKS.md, "Time to quality", where the runs are).
#   python prepare.py && python train.py config/small.py
out_dir = "out-small"
dataset = "shakespeare_char"

# 0.80M parameters. Head size 64 (2 heads of 64, not nanoGPT's 4 of 32): the same FLOPs run
# faster on a CPU, and the loss per step is no worse. In minutes on a CPU, steps beat parameters.
n_layer = 4
n_head = 2
n_embd = 128
block_size = 64
batch_size = 64  # 64 x 64 = 4,096 tokens per step: with Muon the best of 16, 32, 64 and 128 in 300 s
dropout = 0.0  # ~9M tokens in 300 s, ~9 epochs of 1M characters: not yet over-fitting

# The run's length: train.py times its first steps and one evaluation, then sets max_iters =
# lr_decay_iters so that everything ends within 300 s of the process start (it prints the number;
# BENCHMARKS.md, "Time to quality"). --time_budget_s=0 uses max_iters below.
time_budget_s = 300.0
max_iters = 9000
lr_decay_iters = 9000  # = max_iters: decay all the way to min_lr
# Warmup-stable-decay: the LR holds its peak, then falls linearly to min_lr over the last 20% of
# the steps. Per step it learns as the cosine does; what it adds is that, while the LR is flat,
# the budget decides the length again from the speed of the latest steps, so a machine whose
# speed drifts still spends its 300 s on steps.
lr_schedule = "wsd"
cooldown_frac = 0.2  # 0.45 measured no better (1.577 vs 1.572, one pair of AdamW runs at batch 16)

# Muon for the Blocks' matrices (optim.py), AdamW for embeddings, biases and LayerNorms: in 300 s at
# batch 64 it ends at 1.501 against AdamW's 1.582 (BENCHMARKS.md). Its Newton-Schulz iterations cost
# the same at any batch, so larger batches than AdamW's best (16) pay it less often.
optimizer = "muon"
muon_lr = 0.01  # 0.005-0.01 best in a sweep of 0.005-0.08 at batch 16; 0.02 loses at batch 64 too
# AdamW's peak LR, higher than nanoGPT's baby GPT (1e-3): at this size 2.5e-3 learns faster and stays stable.
learning_rate = 2.5e-3
min_lr = 2.5e-4  # learning_rate / 10
warmup_iters = 200  # the time budget times these steps and decides at their end (~25 s)
beta2 = 0.99  # few tokens per step: a longer average of squared gradients

# "auto": bf16 autocast on CPUs with AVX512-BF16/AMX (faster steps than fp32 with the same loss per
# step, `python bench.py train --shapes baby` measures it; attention stays fp32 at this block_size,
# see gpt.attention), fp32 on other CPUs.
dtype = "auto"

eval_interval = 500
eval_iters = 20  # 2 x 20 batches per evaluation, every 500 steps
log_interval = 100
eval_sample_tokens = 100  # each evaluation prints (and logs) 100 characters the model writes

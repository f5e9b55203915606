# Chat fine-tuning (supervised fine-tuning on conversations) of config/small.py's model:
#   python prepare.py --input vowels.jsonl --format chat --tokenizer out-small/ckpt.pt --out data/vowels
#   python train.py config/chat.py
#   python sample.py --out_dir out-chat --chat --temperature 0 --system "Name the vowel."
# README's "Chat fine-tuning" makes vowels.jsonl: 5,000 conversations of a system prompt, a word of
# four letters with one vowel, and that vowel as the reply. The model's shape comes from init_from;
# the vocabulary is the base's plus the 4 chat markers, whose embedding rows train.py adds.
out_dir = "out-chat"
dataset = "vowels"
init_from = "out-small/ckpt.pt"
time_budget_s = 0.0  # the data, not the clock, sets a fine-tune's length: a fixed number of steps

# One conversation per row, padded at its end: block_size needs only to hold the longest
# conversation (prepare.py prints it: 26 tokens here), and more is padding that costs compute.
block_size = 32
batch_size = 32  # conversations per step: 32 x 32 = 1,024 token slots, 32 x 25 = 800 of them filled
                 # (26 tokens are 25 input -> target pairs), 32 x 2 = 64 learned (the vowel, <|end|>)
# 4,500 train conversations / 32 per step = ~140 steps an epoch: 600 steps are ~4 epochs
max_iters = 600
lr_decay_iters = 600  # = max_iters: decay all the way to min_lr
warmup_iters = 20

# 2.5x lower than pretraining's peak (config/small.py: 2.5e-3): the weights are already good
learning_rate = 1e-3
min_lr = 1e-4  # learning_rate / 10
weight_decay = 0.0  # decay would pull the new markers' rows (and every weight) towards zero
beta2 = 0.99  # as config/small.py
dropout = 0.0

eval_interval = 100
eval_iters = 10  # 10 x 32 of the 500 val conversations
log_interval = 20

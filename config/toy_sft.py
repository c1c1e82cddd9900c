# stage 1 of the toy run: supervised fine-tuning on the preferred responses (the paper's SFT step)
out_dir = "out/toy_sft"
data_dir = "data/toy"
init_from = "scratch"
loss_type = "sft"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
global_batch_size = 32
batch_size = 32
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
max_iters = 300
eval_interval = 100
log_interval = 25

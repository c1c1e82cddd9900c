# stage 2 of the toy run: DPO from the SFT model, which is also the frozen reference
out_dir = "out/toy_dpo"
data_dir = "data/toy"
init_from = "out/toy_sft"
loss_type = "sigmoid"
beta = 0.1
global_batch_size = 32
batch_size = 32
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
max_iters = 200
eval_interval = 50
log_interval = 25

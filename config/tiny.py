# A tiny run for tests and smoke checks: a few steps of pruning, then of continued pretraining.
#   python train.py config/tiny.py --init_from=MODEL_DIR --data_dir=DATA_DIR --out_dir=out/tiny
out_dir = "out/tiny"
seed = 0
# fp32 on every CPU: the tests compare resumes to the bit and 2 processes with 1 to fp32 rounding, which bf16 breaks
dtype = "float32"
domain_weighting = "dro+eval"
reference_loss = None  # set per dataset; with None, use dro+dy or constant

prune_steps = 6
prune_batch_size = 4
prune_micro_batch_size = 1
prune_seq_len = 32
prune_lr = 1e-3
prune_warmup = 0.2
lagrangian_warmup = 0.5
lag_lr = 0.5

cpt_steps = 4
cpt_batch_size = 4
cpt_micro_batch_size = 2
cpt_seq_len = 32
cpt_lr = 1e-3
cpt_warmup = 0.25

eval_interval = 2
eval_batches = 2
eval_batch_size = 4
log_interval = 1
save_interval = 2
keep_checkpoints = 2

# The demo: prune the embedded SmolLM2-135M (576 hidden, 30 layers, 9/3 heads, MLP 1536) on the demo corpus with
# DRO data scheduling, compact it, continue pretraining, export. About 10 minutes of training on 2 CPU cores.
#   make demo      (or: python train.py config/demo.py, then python train.py report out/demo)
init_from = "models/smollm2-135m"
data_dir = "data/demo"
out_dir = "out/demo"
seed = 1337

# about half the non-embedding weights: 480 hidden (divisible by the 6 query heads left, as a LLaMA config needs;
# head_dim stays 64), 24 layers, 2 of 3 key/value groups, MLP 1152: 51.6M of 106.2M prunable weights
target_hidden_size = 480
target_num_hidden_layers = 24
target_num_key_value_heads = 2
target_intermediate_size = 1152

# DRO against scaling-law reference losses fitted during the run (+dy), with the moving reference mixture (+dyall),
# on validation losses (+eval): no model family's losses exist for this corpus to derive fixed references from
domain_weighting = "dro+eval+dyall"

prune_steps = 60
prune_batch_size = 4
prune_micro_batch_size = 2
prune_seq_len = 128
prune_lr = 1e-4
prune_warmup = 0.1
lag_lr = 0.2
lagrangian_warmup = 0.6

cpt_steps = 60
cpt_batch_size = 8
cpt_micro_batch_size = 4
cpt_seq_len = 128
cpt_lr = 2e-4
cpt_warmup = 0.1

eval_interval = 4
eval_batches = 2
eval_batch_size = 4
log_interval = 2
save_interval = 20

# Qwen2-7B -> a 1.8b-like GQA shape (DRPruning's: d 1536, 28 layers, 2 key/value groups of 7 query heads, MLP 8960;
# head_dim stays 128) on eight CulturaX languages, with the DRPruning hyper-parameters.
#   python prepare.py --out data/culturax --tokenizer Qwen/Qwen2-7B --hf-dataset uonlp/CulturaX ... (one domain per language)
#   torchrun --standalone --nproc_per_node=8 train.py config/prune_qwen2.py
init_from = "Qwen/Qwen2-7B"
data_dir = "data/culturax"
out_dir = "out/qwen2-7b-to-1.8b"
seed = 17

target_hidden_size = 1536
target_num_hidden_layers = 28
target_num_key_value_heads = 2  # of 4: 14 query heads
target_intermediate_size = 8960

domain_weighting = "dro+dyall"
rho = 0.1
# size^0.3, normalised (CulturaX sizes in GB: en 2846.97, ru 737.20, zh 227.06, ja 107.87, ar 69.35, tr 64.29,
# ko 24.77, th 15.72)
domain_proportions = {"en": 0.2770427, "ru": 0.1847174, "zh": 0.1297392, "ja": 0.1037783, "ar": 0.0908979,
                      "tr": 0.0888547, "ko": 0.0667399, "th": 0.0582299}
reference_loss = {"en": 2.389493, "ru": 1.795453, "zh": 2.626018, "ja": 2.362056, "ar": 2.453045, "tr": 2.535048,
                  "ko": 2.155811, "th": 1.835680}

prune_steps = 3200
prune_batch_size = 32
prune_micro_batch_size = 1
prune_seq_len = 4096
prune_lr = 1e-4
prune_warmup = 0.1
lag_lr = 1.0
lagrangian_warmup = 0.2

cpt_steps = 40000
cpt_batch_size = 256
cpt_micro_batch_size = 2
cpt_seq_len = 4096
cpt_lr = 1e-4
cpt_warmup = 0.03

eval_interval = 50
eval_batches = 16
eval_batch_size = 8
save_interval = 400
prune_activation_checkpointing = 1  # every block: the 152k-vocabulary head and 7.6B weights leave less room
cpt_activation_checkpointing = 0

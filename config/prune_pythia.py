# Pythia-410m -> a Pythia-160m-like shape (d 768, 12 layers, 12 heads of 64, MLP 3072), as Sheared-Pythia-160m,
# on RedPajama's seven domains. No published reference losses for this family: dro+dyall fits them during training
# (each domain keeps its share until it has enough history).
#   torchrun --standalone --nproc_per_node=8 train.py config/prune_pythia.py
init_from = "EleutherAI/pythia-410m"
data_dir = "data/redpajama-neox"  # prepared with the Pythia tokenizer
out_dir = "out/pythia-410m-to-160m"
seed = 17

target_hidden_size = 768
target_num_hidden_layers = 12
target_num_key_value_heads = 12
target_intermediate_size = 3072

domain_weighting = "dro+dyall"
domain_proportions = {"cc": 0.67, "github": 0.045, "book": 0.045, "stackexchange": 0.02, "wiki": 0.045,
                      "arxiv": 0.025, "c4": 0.15}
reference_loss = None

prune_steps = 3200
prune_batch_size = 32
prune_micro_batch_size = 4
prune_seq_len = 2048
prune_lr = 1e-4
prune_warmup = 0.1
lag_lr = 1.0
lagrangian_warmup = 0.2

cpt_steps = 20000
cpt_batch_size = 256
cpt_micro_batch_size = 16
cpt_seq_len = 2048
cpt_lr = 1e-4
cpt_warmup = 0.03

eval_interval = 50
eval_batches = 16
eval_batch_size = 16
save_interval = 400

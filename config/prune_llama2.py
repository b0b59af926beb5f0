# LLaMA-2-7B -> 2.7b (Sheared-LLaMA's shape) on RedPajama's seven domains, with the DRPruning / Sheared-LLaMA
# hyper-parameters: 3,200 pruning steps of 32 x 4096 tokens (0.42B), then 48,000 continued-pretraining steps of
# 256 x 4096 tokens (50B). Prepare the data with domains named as below, e.g.
#   python prepare.py --out data/redpajama --tokenizer meta-llama/Llama-2-7b-hf --hf-dataset cerebras/SlimPajama-627B \
#       --domain-field meta.redpajama_set_name ...   (then rename the domains, or give names matching yours below)
#   torchrun --standalone --nproc_per_node=8 train.py config/prune_llama2.py
init_from = "meta-llama/Llama-2-7b-hf"
data_dir = "data/redpajama"
out_dir = "out/llama2-7b-to-2.7b"
seed = 17

# 2.7b: d 2560, 32 layers, 20 heads, MLP 6912
target_hidden_size = 2560
target_num_hidden_layers = 32
target_num_key_value_heads = 20
target_intermediate_size = 6912
# 1.3b instead: d 2048, 24 layers, 16 heads, MLP 5504, and the 1.3b reference losses below
# target_hidden_size = 2048
# target_num_hidden_layers = 24
# target_num_key_value_heads = 16
# target_intermediate_size = 5504

# DRO in a chi^2 ball (rho 0.1) with the scaling-law reference loss and the moving reference ratio
domain_weighting = "dro+dyall"
rho = 0.1
domain_proportions = {"cc": 0.67, "github": 0.045, "book": 0.045, "stackexchange": 0.02, "wiki": 0.045,
                      "arxiv": 0.025, "c4": 0.15}
# LLaMA-2 7B/13B/70B losses fitted with L(N) = a N^-b + c, evaluated at the target's size (dro.py reference-loss)
reference_loss = {"cc": 1.8712, "github": 0.6883, "book": 2.0325, "stackexchange": 1.5353, "wiki": 1.6297,
                  "arxiv": 1.3560, "c4": 2.0328}  # 2.7b
# reference_loss = {"cc": 1.9643, "github": 0.7459, "book": 2.1393, "stackexchange": 1.6117, "wiki": 1.7590,
#                   "arxiv": 1.4449, "c4": 2.1251}  # 1.3b

prune_steps = 3200
prune_batch_size = 32
prune_micro_batch_size = 1
prune_seq_len = 4096
prune_lr = 1e-4
prune_warmup = 0.1  # 320 steps
lag_lr = 1.0
lagrangian_warmup = 0.2  # 640 steps

cpt_steps = 48000
cpt_batch_size = 256
cpt_micro_batch_size = 2
cpt_seq_len = 4096
cpt_lr = 1e-4
cpt_warmup = 0.03  # 1440 steps

min_lr_ratio = 0.1
weight_decay = 0.0
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0

eval_interval = 50
eval_batches = 16
eval_batch_size = 8
log_interval = 10
save_interval = 400
prune_activation_checkpointing = 0  # off: ≈46 GiB a GPU at micro-batch 1 (docs/operations.md, "Memory plan")
cpt_activation_checkpointing = 0  # off, with the two below: ≈50 GiB a GPU at micro-batch 2 (≈54 GiB distilling)
cpt_reshard_after_forward = False  # the 2.7B bf16 weights stay gathered from forward to backward: +4.4 GiB
cpt_defer_grad_sync = True  # one reduce-scatter a step, not 16: + the fp32 gradients, 10.1 GiB

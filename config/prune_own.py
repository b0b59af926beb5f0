# Your own corpus, the first time: prune a model (the embedded SmolLM2-135M unless --init_from says otherwise) to a
# parameter budget on domains you prepared, with DRO against the source model's own per-domain losses, then
# continue pretraining. The README's "Your own data" section runs it; minutes on 2 CPU cores, as the demo.
#   python prepare.py --tokenizer models/smollm2-135m --out data/mine --domain NAME=GLOB --domain NAME=GLOB ...
#   python train.py config/prune_own.py                           # or --init_from=... --data_dir=... --out_dir=...
#   python train.py --nproc_per_node=2 config/prune_own.py --out_dir=out/mine-2p   # two processes (FSDP2)
init_from = "models/smollm2-135m"
data_dir = "data/mine"
out_dir = "out/mine"
seed = 1337

# a budget instead of a shape: half the source's parameters (<= 1: a fraction; > 1: a count, e.g. 70e6); the log
# prints the shape it picked (l0.TargetShape.from_budget: width first, layers only below half width)
target_params = 0.5

# DRO on validation losses, against the source model's own loss on each domain (measured when each stage starts):
# no other model's losses exist for a new corpus, and a run this short is too short for +dy's scaling-law fit
domain_weighting = "dro+eval"
reference_loss = "teacher"

# the demo's recipe (config/demo.py, docs/results.md "Pilots"): gates from the activation ranking, refined slowly
# (lag_lr 0.02), landed on the target over the last three quarters of a short pruning stage, then most of the time
# in continued pretraining of the compact model. Longer runs: docs/operations.md, "Choosing prune_steps".
mask_init = "importance"
prune_steps = 20
prune_batch_size = 4
prune_micro_batch_size = 2
prune_seq_len = 128
prune_lr = 6e-4
lag_lr = 0.02
lambda_lr = 2.0
lagrangian_warmup = 0.5
prune_landing = 0.75

cpt_steps = 100
cpt_batch_size = 8
cpt_micro_batch_size = 4
cpt_seq_len = 128
cpt_lr = 6e-4

eval_interval = 10
eval_batches = 2
eval_batch_size = 4
log_interval = 2
save_interval = 50
keep_checkpoints = 1

# The demo: prune the embedded SmolLM2-135M (576 hidden, 30 layers, 9/3 heads, MLP 1536) on the demo corpus with
# DRO data scheduling, compact it, continue pretraining, export: minutes on 2 CPU cores (docs/results.md), in fp32
# (on a CPU without native bf16, bf16 is many times slower). The same config runs unchanged on a GPU (bf16 there).
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

# DRO on validation losses (+eval) against the source model's own per-domain losses: the domains the pruning hurt
# most get more data. No model family's losses exist for this corpus to fit references from (as the paper does for
# LLaMA-2), and a run this short gives +dy too few evaluations (it needs 11) for a scaling-law fit. Measured with
#   python train.py eval models/smollm2-135m --data_dir=data/demo --seq_len=128 --batch_size=4 --batches=2
domain_weighting = "dro+eval"
reference_loss = {"code": 3.254, "legal": 2.388, "changelog": 3.788, "man": 3.574, "man-intl": 3.990}

prune_steps = 60
prune_batch_size = 4
prune_micro_batch_size = 2
prune_seq_len = 128
prune_lr = 1e-4
prune_warmup = 0.1
# The gates start saturated (log_alpha = ln 100), where the Lagrangian's pull on them is ~1e-3 of its value and the
# data gradient dominates: the reference's lag_lr 1.0 over 3,200 steps lets lambda grow for hundreds of steps.
# Here, 60 steps: lambda learns 4x faster than the gates, and the target ramps up over the first half, so the
# expected size nears the target before the landing (with lag_lr 0.2 for both it was 0.012 at step 16, against a
# target of 0.27).
lag_lr = 0.5
lambda_lr = 2.0
lagrangian_warmup = 0.5
# the last quarter (15 steps): a projection lands every mask on its target (closing the gap over 8 steps, holding it
# over 7), so compaction cuts nothing the gates still use (docs/results.md)
prune_landing = 0.25

cpt_steps = 60
cpt_batch_size = 8
cpt_micro_batch_size = 4
cpt_seq_len = 128
cpt_lr = 2e-4
cpt_warmup = 0.1

eval_interval = 6
eval_batches = 2
eval_batch_size = 4
log_interval = 2
save_interval = 20
keep_checkpoints = 1  # a checkpoint of the pruning stage (model and AdamW state) is 1.6 GB here

# zero-shot accuracy of the source, compacted and final models (report.py, as lm-evaluation-harness scores it): the
# first 100 validation examples of five tasks, about half a minute per model here (make tasks fetches the data)
eval_tasks = "arc_easy,hellaswag,piqa,sciq,winogrande"
eval_tasks_limit = 100

r"""Synthetic tasks (seqjax.data.synthetic): the loss and accuracy only on answer positions, or one class per example.

  python -m seqjax.main --config=configs/synthetic.py:mqar --workdir=workdirs/mqar                   # Zoology's MQAR
  python -m seqjax.main --config=configs/synthetic.py:mqar --workdir=workdirs/mqar_mamba \
      --config.model.mixer=mamba --config.model.d_model=128 --config.data.name=mqar/len128_pairs8
  python -m seqjax.main --config=configs/synthetic.py:selective_copying --workdir=workdirs/sc      # Mamba's task
  python -m seqjax.main --config=configs/synthetic.py:induction_heads --workdir=workdirs/ih        # trained at 256
  python -m seqjax.main --config=configs/synthetic.py:induction_heads --workdir=workdirs/ih --mode=eval \
      --config.data.eval_split=test_len4096 --config.model.positions=rope                       # evaluated at 16x
  python -m seqjax.main --config=configs/synthetic.py:listops --workdir=workdirs/listops          # classification
  python -m seqjax.main --config=configs/synthetic.py:mqar,smoke --workdir=/tmp/mqar_smoke         # seconds

Variants: mqar, selective_copying, induction_heads, listops, each also as VARIANT,smoke (a tiny model a few steps
on the task's `small` setting). The dataset is built on first use into data.data_dir (default ~/tensorflow_datasets);
`data.name` picks the setting ("mqar/len64_pairs4", "mqar/len128_pairs8", "mqar/len256_pairs16",
"selective_copying/len1024", "listops/len20_100", ...: seqjax/data/synthetic/__init__.py). The metrics (eval and
final_metrics.json): answer_accuracy and sequence_accuracy (lm tasks), accuracy (listops). Sizes are for this
CPU: 2 layers of width 64; scale model.d_model (and model.mlp_dim with it) for the width sweeps of docs/research.md.
Learned positions cover model.max_len: an evaluation longer than training needs a larger max_len, or rope / none.
"""

from seqjax.config import default_config_dict

_DATA = {  # variant: (task, data.name, data.seq_len, model.max_len)
    "mqar": ("lm", "mqar/len64_pairs4", 64, 64),
    "selective_copying": ("lm", "selective_copying/len256", 256, 256),
    "induction_heads": ("lm", "induction_heads/len256", 256, 4096),
    "listops": ("classify", "listops/len100_500", 512, 512),
}
_SMOKE_DATA = {  # The task's `small` setting.
    "mqar": ("mqar/small", 64, 64),
    "selective_copying": ("selective_copying/small", 64, 64),
    "induction_heads": ("induction_heads/small", 32, 128),
    "listops": ("listops/small", 64, 64),
}


def get_config(arg: str | None = None):
  variant, _, size = (arg or "mqar").partition(",")
  if variant not in _DATA or size not in ("", "smoke"):
    raise ValueError(f"unknown variant {arg!r} of configs/synthetic.py; variants: {', '.join(_DATA)}, each "
                     f"optionally followed by ',smoke' (e.g. mqar,smoke)")
  config = default_config_dict()
  config.seed = 0
  config.task, config.data.name, config.data.seq_len, max_len = _DATA[variant]

  m = config.model
  m.mixer = "attention"
  m.d_model = 64
  m.num_layers = 2
  m.mlp_dim = 256
  m.attention.num_heads = 2
  m.attention.implementation = "blockwise"
  m.positions = "learned"
  m.max_len = max_len
  m.dropout = 0.0
  config.classify.pooling = "mean"
  # --mode=generate shows the answers and predictions of the first validation examples (num_tokens is unused).
  config.sample.num_samples, config.sample.num_tokens = 4, 16

  o = config.optim
  o.learning_rate = 1e-3
  o.warmup_steps = 100
  o.weight_decay = 0.1

  t = config.train
  t.num_steps = 2000
  t.batch_size = 64
  t.eval_every = 500
  t.eval_batches = 0  # The whole validation split.
  t.checkpoint_every = 500
  t.log_every = 50

  if size == "smoke":
    config.data.name, config.data.seq_len, m.max_len = _SMOKE_DATA[variant]
    m.d_model, m.mlp_dim = 32, 64
    t.num_steps, t.batch_size, t.eval_every, t.eval_batches = 12, 16, 6, 2
    t.checkpoint_every, t.log_every = 6, 3
    o.warmup_steps = 2
    o.learning_rate = 3e-3
  return config

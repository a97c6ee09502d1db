r"""Byte-level decoder-only Transformer LM on the Python standard library's source (`python_source`).

  python -m seqjax.main --config=configs/lm_pysrc.py --workdir=workdirs/lm_pysrc          # the demo (~10 min, CPU)
  python -m seqjax.main --config=configs/lm_pysrc.py:smoke --workdir=/tmp/smoke           # seconds
  python -m seqjax.main --config=configs/lm_pysrc.py --workdir=workdirs/lm_pysrc --mode=generate \
      --config.sample.prompt='def main('
"""

from seqjax.config import default_config_dict


def get_config(arg: str | None = None):
  config = default_config_dict()
  config.seed = 0

  m = config.model
  m.mixer = "attention"
  m.vocab_size = 259
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.mlp_dim = 1024
  m.positions = "learned"
  m.max_len = 256

  config.data.name = "python_source"
  config.data.seq_len = 256

  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 100

  t = config.train
  t.num_steps = 2000
  t.batch_size = 32
  t.eval_every = 500
  t.eval_batches = 16
  t.checkpoint_every = 500
  t.log_every = 25

  config.sample.prompt = "def "
  config.sample.num_tokens = 200

  if arg == "smoke":
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim, m.max_len = 64, 2, 2, 128, 64
    config.data.seq_len = 64
    t.num_steps, t.batch_size, t.eval_every, t.eval_batches = 20, 8, 10, 2
    t.checkpoint_every, t.log_every = 10, 5
    config.optim.warmup_steps = 5
    config.sample.num_tokens = 32
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/lm_pysrc.py; variants: smoke")
  return config

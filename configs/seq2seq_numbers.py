r"""LSTM encoder-decoder with additive attention: numbers written in digits -> English words (`numbers_to_words`).

  python -m seqjax.main --config=configs/seq2seq_numbers.py --workdir=workdirs/seq2seq_numbers   # a few minutes
  python -m seqjax.main --config=configs/seq2seq_numbers.py:smoke --workdir=/tmp/s2s_smoke          # seconds
  python -m seqjax.main --config=configs/seq2seq_numbers.py --workdir=workdirs/seq2seq_numbers --mode=eval
  python -m seqjax.main --config=configs/seq2seq_numbers.py --workdir=workdirs/seq2seq_numbers --mode=generate \
      --config.sample.prompt='1204 77 905013'

Character-level targets; numbers of 1-6 digits (targets up to 62 characters + EOS). Trained with scheduled
sampling (inverse-sigmoid decay of the teacher-forcing probability) and a length curriculum (targets of at most 16
tokens first, growing to the longest over the first 40% of the steps). Results: docs/recurrent.md.
"""

from seqjax.config import default_config_dict


def get_config(arg: str | None = None):
  config = default_config_dict()
  config.seed = 0
  config.task = "seq2seq"

  config.data.name = "numbers_to_words/standard"
  config.data.train_split = "train"
  config.data.eval_split = "validation"

  s = config.seq2seq
  s.max_digits = 6
  s.embed_dim = 32
  s.hidden = 128
  s.encoder_layers = 1
  s.decoder_layers = 1
  s.bidirectional_encoder = True
  s.attention_dim = 64
  s.dropout = 0.0
  s.teacher_forcing = "inverse_sigmoid"
  s.teacher_forcing_k = 300.0  # p = k / (k + exp(step / k)): 1.00 at step 0, 0.98 at 500, 0.91 at 1000.
  s.teacher_forcing_floor = 0.5
  s.curriculum_start = 16
  s.curriculum_end = 0  # The longest training target.
  s.curriculum_warmup_steps = 400
  s.curriculum_every = 16
  s.decode_max_len = 64
  s.log_examples = 3

  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.01

  t = config.train
  t.num_steps = 1000
  t.batch_size = 64
  t.eval_every = 250
  t.eval_batches = 0  # The whole validation split (1500 numbers of 1-6 digits).
  t.checkpoint_every = 250
  t.log_every = 50

  config.sample.prompt = "1204 77 905013"

  if arg == "smoke":
    config.data.name = "numbers_to_words/small"
    s.max_digits = 3
    s.embed_dim, s.hidden, s.attention_dim = 16, 32, 16
    s.teacher_forcing_k = 5.0
    s.curriculum_start, s.curriculum_warmup_steps, s.curriculum_every = 16, 6, 16
    s.decode_max_len = 32
    s.log_examples = 2
    config.optim.warmup_steps = 2
    t.num_steps, t.batch_size, t.eval_every, t.eval_batches = 12, 16, 6, 2
    t.checkpoint_every, t.log_every = 6, 3
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/seq2seq_numbers.py; variants: smoke")
  return config

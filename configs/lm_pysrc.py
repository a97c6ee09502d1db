r"""Byte-level decoder-only LM on the Python standard library's source (`python_source`).

  python -m seqjax.main --config=configs/lm_pysrc.py --workdir=workdirs/lm_pysrc          # the demo (~10 min, CPU)
  python -m seqjax.main --config=configs/lm_pysrc.py:smoke --workdir=/tmp/smoke           # seconds
  python -m seqjax.main --config=configs/lm_pysrc.py:mamba --workdir=workdirs/lm_mamba    # other mixers: mamba,
      mamba2, lstm, hybrid (mamba,mamba,attention), each at about the Transformer's parameter count
  python -m seqjax.main --config=configs/lm_pysrc.py:moe --workdir=workdirs/lm_moe    # 8 experts, top-2, each half
      the Transformer's MLP width (the same active parameters per token); moe,smoke: seconds (docs/moe.md)
  python -m seqjax.main --config=configs/lm_pysrc.py:gla --workdir=workdirs/lm_gla    # the variant zoo (ZOO below):
      linear, performer, retnet, gla, deltanet, gated_deltanet, based, rwkv, longformer, bigbird, reformer, s4d, s5,
      gru, rnn, moe_every2; each at about the Transformer's parameters (docs/comparison.md)
  python -m seqjax.main --config=configs/lm_pysrc.py --workdir=workdirs/lm_pysrc --mode=generate \
      --config.sample.prompt='def main('
"""

from seqjax.config import default_config_dict

# The variant zoo (docs/comparison.md, "All causal mixers"): model overrides of the Transformer above (4 layers,
# d_model 128, MLP 512, 821,888 parameters) that put each causal registered mixer at about the same parameter count.
# Attention-like mixers keep the Transformer's blocks (4 layers, MLP) and absorb their extra or missing mixer
# parameters in the MLP width; recurrent stacks drop the MLP and are sized by their layer count (as :lstm);
# RWKV's mixer is the whole RWKV block (its channel mix of width mlp_dim replaces the MLP): 3 of them.
ZOO: dict[str, dict] = {
    "linear": {"mixer": "linear"},
    "performer": {"mixer": "performer"},
    "retnet": {"mixer": "retnet", "mlp_dim": 448},
    "gla": {"mixer": "gla", "mlp_dim": 432},
    "deltanet": {"mixer": "deltanet"},
    "gated_deltanet": {"mixer": "gated_deltanet", "mlp_dim": 444},
    "based": {"mixer": "based", "mlp_dim": 320},
    "rwkv": {"mixer": "rwkv", "num_layers": 3, "mlp_dim": 416, "mlp": "none"},
    "longformer": {"mixer": "longformer"},
    "bigbird": {"mixer": "bigbird"},
    "reformer": {"mixer": "reformer", "mlp_dim": 576},
    "s4d": {"mixer": "s4d", "mlp_dim": 640, "ssm.mode": "chunked"},  # packed documents (segment ids) need resets:
    # the chunked form (docs/ssm.md); the associative scan ("parallel") computes the same function ~40x slower.
    "s5": {"mixer": "s5", "mlp_dim": 576},
    "gru": {"mixer": "gru", "num_layers": 7, "mlp": "none"},
    "rnn": {"mixer": "rnn", "mlp_dim": 576},
    # The Transformer with a mixture of experts in every 2nd block: 8 experts of width 64, each token to 2, so the
    # total parameters stay the Transformer's (8 x 64 = its 512 MLP units) and a MoE block's active MLP is a quarter.
    "moe_every2": {"moe.num_experts": 8, "moe.top_k": 2, "moe.expert_dim": 64, "moe.every": 2,
                   "moe.capacity_factor": 1.25},
}


def get_config(arg: str | None = None):
  config = default_config_dict()
  config.seed = 0

  m = config.model
  m.mixer = "attention"
  # Sized for a CPU: at ~0.8M parameters and a few million tokens the budget is best spent on more steps.
  m.d_model = 128
  m.num_layers = 4
  m.attention.num_heads = 4
  m.mlp_dim = 512
  m.positions = "rope"  # Learned positions train markedly slower here (3.99 vs 3.63 bits/byte at 300 steps).
  m.attention.implementation = "blockwise"
  m.max_len = 256

  config.data.name = "python_source"
  config.data.seq_len = 256

  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 100

  t = config.train
  t.num_steps = 1600
  t.batch_size = 16
  t.eval_every = 400
  t.eval_batches = 32
  t.checkpoint_every = 400
  t.log_every = 25

  config.sample.prompt = "def "
  config.sample.num_tokens = 200

  variant, _, size = (arg or "").partition(",")
  if variant in ("mamba", "mamba2", "lstm", "hybrid"):
    # Mixer-only stacks (no MLP; the hybrid keeps its MLPs), sized to the Transformer's ~0.8M parameters.
    m.mixer = {"mamba": "mamba", "mamba2": "mamba2", "lstm": "lstm", "hybrid": "mamba,mamba,attention"}[variant]
    m.mlp = "none" if variant != "hybrid" else "mlp"
    m.num_layers = {"mamba": 7, "mamba2": 7, "lstm": 6, "hybrid": 3}[variant]
  if variant == "moe":
    # Mixture of experts (docs/moe.md): 8 experts of half the MLP width, each token to 2 (the dense MLP's active
    # parameters), capacity factor 1.25, load-balancing and z losses at the Switch / ST-MoE weights.
    m.moe.num_experts, m.moe.top_k, m.moe.expert_dim, m.moe.capacity_factor = 8, 2, m.mlp_dim // 2, 1.25
  if variant in ZOO:
    # The variant zoo of docs/comparison.md: every causal registered mixer at about the Transformer's parameters.
    for field, value in ZOO[variant].items():
      node = m
      *parents, leaf = field.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  arg = size or (None if variant in ("mamba", "mamba2", "lstm", "hybrid", "moe") or variant in ZOO else arg)

  if arg == "smoke":
    m.d_model, m.num_layers, m.attention.num_heads, m.mlp_dim, m.max_len = 64, 2, 2, 128, 64
    m.moe.expert_dim = m.moe.expert_dim and m.mlp_dim // 2
    config.data.seq_len = 64
    t.num_steps, t.batch_size, t.eval_every, t.eval_batches = 20, 8, 10, 2
    t.checkpoint_every, t.log_every = 10, 5
    config.optim.warmup_steps = 5
    config.sample.num_tokens = 32
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/lm_pysrc.py; variants: smoke, mamba, mamba2, lstm, "
                     f"hybrid, moe, {', '.join(ZOO)}, and VARIANT,smoke")
  return config

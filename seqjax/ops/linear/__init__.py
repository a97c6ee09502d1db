"""Linear-attention kernels: the public entry (`from seqjax.ops import linear`).

One matrix-state recurrence, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, in three forms that tests
prove equal (tests/ops/linear/): "parallel" (quadratic, masked: the reference), "recurrent" (`lax.scan`, one token
from the state) and "chunked" (parallel inside chunks, the state carried across them; the default)
(`recurrence.py`: `decayed_linear_attention`, `decayed_step`). The variants choose q, k, v and the decay g
(`variants.py`): `linear_attention` (elu + 1 features, normalised; Katharopoulos et al.), `retention` with
`retnet_log_decay` (RetNet), FAVOR+ features for the Performer (`favor_features`, `orthogonal_random_features`),
`gated_linear_attention` with `gla_log_decay` (GLA), and their decoding steps. The
delta rule (DeltaNet), whose state is corrected rather than decayed, has its own three forms, chunked by the UT
transform (`delta.py`: `delta_rule`, `delta_rule_step`; with `log_decay`, the gated delta rule of Gated DeltaNet).
RWKV-6's wkv (read before write, a bonus for the current token) runs on the decayed recurrence with keys shifted one
token later (`rwkv.py`: `rwkv6_wkv`, `rwkv6_wkv_step`, `token_shift`).

Legend: B batch, T length, N heads, P key / query feature dim, H value head dim, C chunk length. States are float32
[B, N, P, H]; every form takes `segment_ids` [B, T] (the state resets where the id changes: packed documents), an
initial state, and returns the state after the last position on request (prefill). Every op accepts any array-like.
"""

from seqjax.ops.linear.delta import delta_rule, delta_rule_step
from seqjax.ops.linear.rwkv import rwkv6_wkv, rwkv6_wkv_step, token_shift
from seqjax.ops.linear.recurrence import (DEFAULT_CHUNK_SIZE, DEFAULT_FEATURE_DECAY_CHUNK_SIZE, MODES,
                                         decayed_linear_attention, decayed_step)
from seqjax.ops.linear.variants import (FEATURE_MAPS, decayed_attention_step, favor_features, feature_draw_key,
                                        feature_map,
                                        gated_linear_attention, gla_log_decay, linear_attention,
                                        linear_attention_step, orthogonal_random_features, retention,
                                        retnet_log_decay, taylor_features)

__all__ = [
    "DEFAULT_CHUNK_SIZE", "DEFAULT_FEATURE_DECAY_CHUNK_SIZE", "FEATURE_MAPS", "MODES", "decayed_attention_step",
    "decayed_linear_attention", "decayed_step", "delta_rule", "delta_rule_step", "favor_features", "feature_map",
    "gated_linear_attention", "gla_log_decay", "linear_attention", "linear_attention_step", "orthogonal_random_features", "retention", "retnet_log_decay",
    "rwkv6_wkv", "rwkv6_wkv_step", "taylor_features", "token_shift", "feature_draw_key",
]

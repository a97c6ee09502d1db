"""Mixture-of-experts ops: routing, the auxiliary losses, and the two ways of sending tokens to their experts.

    from seqjax.ops import moe
    r = moe.route(x_BTD, w_router_DJ, top_k=2)                    # float32 logits, gates, chosen experts
    moe.load_balance_loss(r.probs_BTJ, r.experts_BTA)             # Switch: J * sum_j f_j P_j (1 when uniform)
    moe.router_z_loss(r.logits_BTJ)                               # mean logsumexp(logits)^2
    y_BTD, dropped = moe.capacity_moe(x_BTD, r, experts, capacity_factor=1.25)   # fixed-size buffers, drops
    y_BTD = moe.dropless_moe(x_BTD, r, experts)                   # sorted tokens, grouped matmuls (ragged_dot)

`experts` is an `ExpertWeights` (wi [J, D, F], optional wg [J, D, F] for the gated kind, wo [J, F, D]) with the
activation. The letters of these ops (docs/ARCHITECTURE.md): J experts, A experts chosen per token (top-k),
Q capacity slots per expert and row, Y the B·T·A (token, choice) assignments of dropless dispatch.
"""

from seqjax.ops.moe.dispatch import ExpertWeights, capacity, capacity_moe, dropless_moe, expert_ffn
from seqjax.ops.moe.routing import Routing, load_balance_loss, route, router_z_loss

__all__ = ["ExpertWeights", "Routing", "capacity", "capacity_moe", "dropless_moe", "expert_ffn",
           "load_balance_loss", "route", "router_z_loss"]

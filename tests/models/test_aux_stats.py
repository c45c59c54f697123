"""The aux schema (moejax.moe.stats): the model reports exactly the declared keys, and the merge over
micro-batches and the load metrics follow the declarations."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import stats
from tests.models.test_transformer import PATTERN, pattern_models, tokens, train_step


def test_model_aux_keys_are_the_schema():
  _, model = pattern_models()
  _, _, aux, _ = train_step(model, tokens())
  assert set(aux) == {stats.AUX_LOSS, *stats.LAYER_STATS}
  n = PATTERN.num_moe_layers
  for name, s in stats.LAYER_STATS.items():
    if s.layers == "mean":
      assert aux[name].shape == (), name
    else:
      width = {"scalar": (), "expert": (PATTERN.max_num_experts,), "device": (1,)}[s.shape]
      assert aux[name].shape == (n, *width), name
  empty = stats.empty(4)
  assert empty.keys() == aux.keys() and empty["expert_counts"].shape == (0, 4)


def test_undeclared_layer_keys_are_errors():
  aux = {k: jnp.zeros(()) for k in stats.LAYER_STATS}
  stats.check_layer_aux(aux)
  with pytest.raises(ValueError, match=r"does not declare \(\['new_stat'\]\)"):
    stats.check_layer_aux({**aux, "new_stat": jnp.zeros(())})
  with pytest.raises(ValueError, match=r"lacks declared keys \(\['a2a_bytes'\]\)"):
    stats.check_layer_aux({k: v for k, v in aux.items() if k != "a2a_bytes"})
  with pytest.raises(ValueError, match="'new_stat' is not declared"):
    stats.merge_microbatches([{"new_stat": jnp.ones(())}] * 2, [0.5, 0.5])


def test_merge_microbatches_follows_the_declarations():
  a = {
    "aux_loss": jnp.asarray(1.0),
    "router_z_loss": jnp.asarray(2.0),
    "expert_counts": jnp.asarray([[3.0, 1.0, 0.0]]),
    "expert_load": jnp.asarray([[0.75, 0.25, 0.0]]),
    "a2a_bytes": jnp.asarray([10.0]),
  }
  b = {
    "aux_loss": jnp.asarray(3.0),
    "router_z_loss": jnp.asarray(4.0),
    "expert_counts": jnp.asarray([[1.0, 3.0, 0.0]]),
    "expert_load": jnp.asarray([[0.25, 0.75, 0.0]]),
    "a2a_bytes": jnp.asarray([6.0]),
  }
  out = stats.merge_microbatches([a, b], [0.25, 0.75])
  assert list(out) == list(a)
  np.testing.assert_allclose(out["aux_loss"], 2.5)  # token-weighted means
  np.testing.assert_allclose(out["router_z_loss"], 3.5)
  np.testing.assert_array_equal(out["expert_counts"], [[4.0, 4.0, 0.0]])  # sums
  np.testing.assert_array_equal(out["a2a_bytes"], [16.0])
  np.testing.assert_array_equal(out["expert_load"], [[0.5, 0.5, 0.0]])  # from the merged counts


def test_load_imbalance_counts_only_real_experts():
  # Rows of 4 and 2 real experts, zero-padded to 4.
  counts = jnp.asarray([[4.0, 2.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]])
  np.testing.assert_allclose(stats.load_imbalance(counts, (4, 2)), [2.0, 1.5])
  np.testing.assert_allclose(stats.load_imbalance(counts), [2.0, 3.0])  # read as 4 wide
  np.testing.assert_array_equal(stats.load_imbalance(counts, (4, 4)), stats.load_imbalance(counts))
  padded = stats.pad_experts({"expert_counts": jnp.ones((2, 3)), "router_entropy": jnp.ones(2)}, 5)
  assert padded["expert_counts"].shape == (2, 5) and padded["router_entropy"].shape == (2,)
  assert float(padded["expert_counts"][:, 3:].sum()) == 0.0

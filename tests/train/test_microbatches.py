"""Micro-batches (`config.train.microbatches`): the step over M slices of the batch against the step
over the whole batch, and against per-slice gradients computed here by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.kernels.grouped_matmul import blas
from moejax.models import lm_loss
from moejax.train.config import base_config
from moejax.train.trainer import Trainer, build_model_config

VOCAB = 64


def _config(microbatches, *, aux=True, jitter=0.0, batch=8):
  config = base_config()
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 32, 2, 2, 1
  m.dense_hidden_dim, m.first_k_dense, m.scan_layers = 64, 0, False
  m.moe.update(num_experts=4, top_k=2, expert_hidden_dim=32, jitter_noise=jitter)
  if not aux:
    m.load_balance_coef = m.seq_balance_coef = m.z_loss_coef = 0.0
  config.train.update(batch_size=batch, seq_len=16, microbatches=microbatches)
  return config


def _trainer(config, devices=1):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  return Trainer(config, build_model_config(config, VOCAB), mesh)


def _batch(seed=0, batch=8, padded_rows=()):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, 17)).astype(np.int32)
  mask = np.ones((batch, 16), np.float32)
  for row in padded_rows:  # the row's second half is padding
    mask[row, 8:] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def _step(trainer, batch, state=None):
  params, rest, opt_state = state or trainer.init()
  return jax.block_until_ready(trainer.train_step(params, rest, opt_state, batch))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@functools.cache
def _whole_batch_step():
  # Rows 0-2 are half padding: the micro-batches hold different token counts, so the sum must be
  # token-weighted to give the whole batch's mean loss and gradient.
  batch = _batch(padded_rows=(0, 1, 2))
  return batch, _step(_trainer(_config(1, aux=False)), batch)


# Every test here compiles whole train steps (~10-40 s on 2 cores): the fast tier keeps M=2, the
# bit-reproducibility and thread-split tests; the rest are slow.
@pytest.mark.parametrize("microbatches", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_microbatches_take_the_whole_batch_step_without_aux_losses(microbatches):
  batch, whole = _whole_batch_step()
  micro_trainer = _trainer(_config(microbatches, aux=False))
  assert micro_trainer._pool is not None  # one CPU device: the micro-batches run on threads
  micro = _step(micro_trainer, batch)
  np.testing.assert_allclose(_flat(micro[0]), _flat(whole[0]), rtol=2e-5, atol=2e-6)
  # Adam's moments after one step: 0.1 g and 0.05 g^2. The slices' sums add the same terms in
  # another order: float32 rounding of the largest gradient entries (~1e-2), ~1e-9 absolute.
  np.testing.assert_allclose(_flat(micro[2]), _flat(whole[2]), rtol=2e-5, atol=1e-8)
  m1, m2 = micro[3], whole[3]
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  assert float(m1["num_tokens"]) == float(m2["num_tokens"]) == 8 * 16 - 3 * 8
  np.testing.assert_array_equal(m1["expert_load"], m2["expert_load"])
  np.testing.assert_array_equal(m1["load_imbalance"], m2["load_imbalance"])


@pytest.mark.slow
def test_microbatch_gradient_is_the_token_weighted_mean_of_the_slices():
  """With the auxiliary losses on, the step's gradient is sum_i n_i / N * grad(loss_i + aux_i),
  computed here from the model on each slice."""
  batch = _batch(seed=1, padded_rows=(5,))
  trainer = _trainer(_config(2))
  params, rest, opt_state = trainer.init()
  graphdef = trainer.graphdef

  @functools.partial(jax.jit, static_argnums=0)
  def slice_grad(rows):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
      part = {k: v[rows[0] : rows[1]] for k, v in batch.items()}
      logits, aux = model(part["inputs"], token_mask=part["mask"])
      loss, n = lm_loss(logits, part["targets"], part["mask"])
      return loss + aux["aux_loss"], (n, loss)

    return jax.grad(loss_fn, has_aux=True)(params)

  (g0, (n0, l0)), (g1, (n1, l1)) = slice_grad((0, 4)), slice_grad((4, 8))
  assert float(n0) != float(n1)
  expect = jax.tree.map(lambda a, b: (n0 * a + n1 * b) / (n0 + n1), g0, g1)
  # The optimizer turns the gradient into the update; compare the gradients through grad_norm
  # and the update through a plain AdamW step on the expected gradient.
  updates, _ = trainer.tx.update(expect, opt_state, params)
  expect_params = jax.tree.map(lambda p, u: p + u, params, updates)
  new_params, _, _, metrics = _step(trainer, batch, (params, rest, opt_state))
  np.testing.assert_allclose(_flat(new_params), _flat(expect_params), rtol=2e-5, atol=2e-6)
  norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(expect))))
  np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), (n0 * l0 + n1 * l1) / (n0 + n1), rtol=1e-6)


def test_threaded_microbatches_are_bit_reproducible():
  """Threads change when a micro-batch runs, never what it computes: the threaded step equals
  the sequential one, and itself, bit for bit, over steps."""
  batches = [_batch(seed=s) for s in range(3)]
  trainer = _trainer(_config(2, jitter=0.05))
  pool = trainer._pool
  runs = []
  for threads in (True, False, True):
    trainer._pool = pool if threads else None
    state = trainer.init()
    losses = []
    for batch in batches:
      *state, metrics = _step(trainer, batch, state)
      losses.append(float(metrics["loss"]))
    runs.append((losses, _flat(state[0])))
  for losses, params in runs[1:]:
    assert losses == runs[0][0]
    np.testing.assert_array_equal(params, runs[0][1])


def test_threaded_microbatches_split_the_cores_between_them(monkeypatch):
  """Two micro-batches in flight on one CPU device: each grouped matmul call gets half the host
  kernels' threads (every program already keeps a core busy), the first, sequential call too;
  in turn (no thread pool) each call gets them all."""
  monkeypatch.setattr(blas, "_num_threads", 4)
  seen = []
  split = blas._run_split
  monkeypatch.setattr(
    blas, "_run_split", lambda *args: (seen.append(blas.num_threads()), split(*args))[1]
  )
  trainer = _trainer(_config(2))
  assert trainer._pool is not None
  state = trainer.init()
  for _ in range(2):  # the first call runs in turn and compiles, the second on the threads
    *state, _ = _step(trainer, _batch(), state)
    assert seen and set(seen) == {2}
    seen.clear()
  assert blas.num_threads() == 4
  trainer._pool = None
  _step(trainer, _batch(), state)
  assert seen and set(seen) == {4}


@pytest.mark.slow
def test_microbatches_keep_the_rng_keys_and_draw_their_own_noise():
  batch = _batch(seed=2)
  one = _trainer(_config(1, jitter=0.05))
  two = _trainer(_config(2, jitter=0.05))
  _, rest_one, _, _ = _step(one, batch)
  _, rest_two, _, _ = _step(two, batch)
  # The step leaves the same RNG state behind: keys unchanged, counters advanced once.
  leaves = lambda r: jax.tree.leaves(r, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for a, b in zip(leaves(rest_one), leaves(rest_two), strict=True):
    x, y = a[...], b[...]
    if isinstance(a, nnx.RngKey):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(x, y)
  # Each micro-batch draws its own noise: the second slice's copy of the first slice's rows is not
  # routed with the first slice's noise.
  params, rest, _ = two.init()
  same = {k: np.concatenate([v[:4], v[:4]]) for k, v in batch.items()}
  r0 = two._micro_step(params, rest, two.put_batch(same, 0, 2), np.int32(0))[3]
  r1 = two._micro_step(params, rest, two.put_batch(same, 1, 2), np.int32(1))[3]
  assert not np.array_equal(np.asarray(r0["router_entropy"]), np.asarray(r1["router_entropy"]))


@pytest.mark.slow  # two trainers on a 2x2 mesh
def test_microbatches_on_a_mesh_run_in_turn():
  """On several devices the micro-batches run one after the other (no threads), expert
  parallelism included, and still take the whole batch's step."""
  batch = _batch(seed=3, batch=16)
  config = _config(2, aux=False, batch=16)
  config.mesh.update(data=2, expert=2)
  micro_trainer = _trainer(config, devices=4)
  assert micro_trainer._pool is None
  whole_config = _config(1, aux=False, batch=16)
  whole_config.mesh.update(data=2, expert=2)
  whole = _step(_trainer(whole_config, devices=4), batch)
  micro = _step(micro_trainer, batch)
  np.testing.assert_allclose(_flat(micro[0]), _flat(whole[0]), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(micro[3]["loss"], whole[3]["loss"], rtol=1e-6)


@pytest.mark.parametrize(
  "value,message",
  [
    (3, "config.train.microbatches=3 must divide the batch_size=8"),
    (0, "config.train.microbatches=0; allowed: an int >= 1"),
  ],
)
def test_bad_microbatches_name_the_field(value, message):
  config = _config(1)
  config.train.microbatches = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    _trainer(config)


def test_microbatches_the_mesh_cannot_split_name_the_field():
  config = _config(2)  # micro-batches of 4 rows over 8 data shards
  with pytest.raises(ValueError, match="microbatches=2 leaves micro-batches of 4 rows"):
    _trainer(config, devices=8)

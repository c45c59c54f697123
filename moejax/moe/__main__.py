"""A first look at the MoE layer: fit a randomly initialised teacher MoE with a student MoE.

    python -m moejax.moe --router sigmoid --dispatch capacity --steps 300

Trains one layer with optax AdamW on a regression target, adds the load-balance loss, applies the
aux-loss-free bias update when the router has one, and prints loss, expert load and dropped fraction.
It runs in well under a minute on a laptop CPU. (The language-model training job is
`python -m moejax.train`, built on the same layer.)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.moe import ROUTERS, MoE, MoEConfig


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--router", default="softmax_topk", choices=ROUTERS)
  parser.add_argument("--dispatch", default="dropless", choices=("dropless", "capacity"))
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lb-coef", type=float, default=0.01, help="load-balance loss coefficient")
  args = parser.parse_args(argv)

  d, f, b, s = 32, 64, 8, 32
  cfg = MoEConfig(
    d_model=d,
    num_experts=args.experts,
    top_k=args.top_k,
    expert_hidden_dim=f,
    router=args.router,
    dispatch=args.dispatch,
    capacity_factor=1.25,
    aux_free_bias=args.router == "sigmoid",
  )
  teacher = MoE(
    cfg.replace(router="softmax_topk", dispatch="dropless", aux_free_bias=False), rngs=nnx.Rngs(1)
  )
  student = MoE(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(student, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(student, optimizer, x):
    target, _ = teacher(x)

    def loss_fn(model):
      y, aux = model(x)
      mse = jnp.mean((y - target) ** 2) / jnp.mean(target**2)
      return mse + args.lb_coef * aux["load_balance_loss"], (mse, aux)

    (_, (mse, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(student)
    optimizer.update(student, grads)
    student.update_aux_free_bias(aux["expert_counts"])
    return mse, aux

  key = jax.random.key(0)
  start = time.perf_counter()
  mse = float("nan")
  for step in range(args.steps + 1):
    key, sub = jax.random.split(key)
    mse, aux = train_step(student, optimizer, jax.random.normal(sub, (b, s, d)))
    if step % max(1, args.steps // 10) == 0:
      load = aux["expert_load"]
      print(
        f"step {step:4d}  relative mse {float(mse):.4f}  "
        f"load max/mean {float(load.max() * load.shape[0]):.2f}  "
        f"dropped {float(aux['dropped_fraction']):.3f}  "
        f"experts/token {float(aux['experts_per_token']):.2f}"
      )
  print(
    f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s, router={args.router}, "
    f"dispatch={args.dispatch}"
  )
  return float(mse)


if __name__ == "__main__":
  main()

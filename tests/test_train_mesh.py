"""Same initial loss and gradients on every mesh (8 simulated CPU devices, in a subprocess).

Meshes (data x fsdp x expert x tensor): 1x1x1x1 (one device, no shard_map), 2x2x2x1,
1x2x4x1 and 2x1x2x2: data/fsdp parallel, expert parallel MoE under shard_map (all-gather /
reduce-scatter over `expert`), and tensor-parallel heads and expert FFN width.
"""
import json
import os
import subprocess
import sys

import numpy as np

MESHES = [(1, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (2, 1, 2, 2)]
STEP_MESH = (2, 1, 2, 2)   # one full jitted train step (optimizer state sharded, donation) here


def _worker(out_path):
  import jax
  import jax.numpy as jnp
  import optax
  from hunyuan_jax.train.checkpointing import Checkpointer
  from hunyuan_jax.model import moe_parallel
  from hunyuan_jax.sharding import make_mesh
  from hunyuan_jax.tokenizer import ByteTokenizer
  from hunyuan_jax.train import data as data_lib
  from hunyuan_jax.train.optimizer import make_optimizer
  from hunyuan_jax.train.run_config import load_run_config
  from hunyuan_jax.train.step import (abstract_state, batch_shardings, fresh_state, jit_train_step,
                                      loss_fn, state_shardings)
  from hunyuan_jax.model import abstract_params

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = load_run_config(os.path.join(root, "configs", "train_tiny.json"))
  cfg = run.model_config()
  assert cfg.dtype == "float32"  # tolerances below assume fp32 compute
  batch = next(data_lib.PackedBatches(data_lib.stdlib_files(), ByteTokenizer(), 8, 32))
  tx, lr_fn = make_optimizer(run.optim, cfg, abstract_params(cfg), 10)
  abstract = abstract_state(cfg, tx)
  out = {}
  for shape in MESHES:
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    sh = state_shardings(abstract, cfg, mesh)
    state = jax.jit(lambda r: fresh_state(cfg, tx, r), out_shardings=sh)(jax.random.key(0))
    b_sh = batch_shardings(mesh)

    def grads(params, batch):
      with moe_parallel.use_mesh(mesh):
        return jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jnp.sum(batch["loss_mask"]), cfg=cfg, moe=run.moe, num_micro=1)

    (loss, aux), g = jax.jit(grads, in_shardings=(sh["params"], b_sh))(state["params"], batch)
    name = "x".join(map(str, shape))
    out[f"{name}/loss"] = np.asarray(loss)
    out[f"{name}/ce"] = np.asarray(aux["ce_sum"] / np.sum(batch["loss_mask"]))
    out[f"{name}/grad_norm"] = np.asarray(optax.global_norm(g))
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
      out[f"{name}/grad/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    if shape == STEP_MESH:
      step = jit_train_step(cfg, run.moe, tx, lr_fn, 2, mesh, sh)
      state, m = step(state, batch)
      saved = jax.device_get(state["params"])
      state, m2 = step(state, batch)
      out["step/ce"] = np.asarray(m["loss"])
      out["step/grad_norm"] = np.asarray(m["grad_norm"])
      out["step/second_loss"] = np.asarray(m2["loss"])
      ckpt_state = state
  # Restore the last state saved on STEP_MESH into the shardings of another mesh.
  ckpt = Checkpointer(os.path.dirname(out_path), every=1, keep=1)
  ckpt.maybe_save(2, ckpt_state, {"epoch": 0, "file": 0, "doc": 0, "offset": 0}, force=True)
  ckpt.wait()
  other = make_mesh(1, 2, 4, 1)
  restored, _ = ckpt.restore(abstract, state_shardings(abstract, cfg, other))
  ckpt.close()
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      jax.device_get(restored), jax.device_get(ckpt_state))
  out["restore/equal"] = np.asarray(all(jax.tree.leaves(same)))
  wi = restored["params"]["groups_0"]["layer_0"]["moe"]["wi"]
  out["restore/wi_on_target_mesh"] = np.asarray(wi.sharding.mesh.shape["expert"] == 4
                                                and len(wi.addressable_shards) == 8
                                                and wi.addressable_shards[0].data.shape[1] == 8 // 4)
  del saved
  np.savez(out_path, **out)


def test_same_loss_and_grads_on_all_meshes(tmp_path):
  out = tmp_path / "mesh.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = dict(np.load(out))
  ref = "1x1x1x1"
  grad_keys = [k[len(ref) + 1:] for k in res if k.startswith(ref + "/grad/")]
  assert len(grad_keys) > 10
  for shape in MESHES[1:]:
    name = "x".join(map(str, shape))
    np.testing.assert_allclose(res[f"{name}/loss"], res[f"{ref}/loss"], rtol=1e-5, err_msg=name)
    for k in grad_keys:
      g, g_ref = res[f"{name}/{k}"], res[f"{ref}/{k}"]
      # fp32, different reduction orders: relative error of the whole leaf.
      err = np.linalg.norm(g - g_ref) / (np.linalg.norm(g_ref) + 1e-12)
      assert err < 1e-4, (name, k, err)
  # The full step (2 microbatches, sharded optimizer, donation): the accumulated cross-entropy is
  # the full batch's; the grad norm too, up to the aux losses, which are per microbatch (weights
  # 0.01 / 0.001, hence the looser 2%). One update lowers the loss.
  np.testing.assert_allclose(res["step/ce"], res[f"{ref}/ce"], rtol=1e-5)
  np.testing.assert_allclose(res["step/grad_norm"], res[f"{ref}/grad_norm"], rtol=2e-2)
  assert res["step/second_loss"] < res["step/ce"]
  # A checkpoint saved on one mesh restores bit-exactly into another mesh's shardings.
  assert res["restore/equal"] and res["restore/wi_on_target_mesh"]


if __name__ == "__main__":
  _worker(sys.argv[1])


ALL_REDUCE_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import json, re
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import moe_parallel
from hunyuan_jax.model.moe import MoE
from hunyuan_jax.sharding import make_mesh, shardings_for
cfg = ModelConfig(family="a13b", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16, intermediate_size=32, mlp_layer_types=("moe",),
                  num_experts=8, moe_top_k=(2,), moe_intermediate_size=(16,),
                  shared_expert_size=(32,), dtype="float32", param_dtype="float32")
moe = MoE(cfg, cfg.layer_spec(0))
x = jax.random.normal(jax.random.key(0), (2, 8, 32))
boxed = moe.init(jax.random.key(1), x)
params = nn.unbox(boxed)
one = np.asarray(moe.apply(params, x)[0])
mesh = make_mesh(tensor=2)
sh = shardings_for(nn.get_partition_spec(boxed), params, mesh)

def run(p, x):
  with moe_parallel.use_mesh(mesh):
    return moe.apply(p, x)[0]

f = jax.jit(run, in_shardings=(sh, NamedSharding(mesh, P())))
hlo = f.lower(params, x).compile().as_text()
many = np.asarray(f(params, x))
# XLA's combiner may merge separate all-reduces into one op: count the arrays reduced
operands = re.findall(r"all-reduce(?:-start)?\(([^)]*)\)", hlo)
print(json.dumps({"all_reduced_arrays": sum(len(o.split(",")) for o in operands),
                  "shared_sharded": str(sh["params"]["shared"]["wo"].spec),
                  "rel": float(np.abs(many - one).max() / np.abs(one).max())}))
"""


def test_tensor_parallel_moe_reduces_routed_and_shared_once():
  """The shared expert's partial sum joins the routed experts' before the one tensor all-reduce
  (a GSPMD shared expert would add a second all-reduce per layer: 3 per decode layer on 2 GPUs)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", ALL_REDUCE_SCRIPT], capture_output=True, text=True,
                        env=env, timeout=300, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "tensor" in out["shared_sharded"]       # the shared expert's width is split
  assert out["all_reduced_arrays"] == 1
  assert out["rel"] < 1e-5                       # fp32: the same output as one device

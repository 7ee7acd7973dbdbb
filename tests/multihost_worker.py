"""One process of a two-process jax.distributed run on 127.0.0.1 (started by test_multihost.py).

Loads a checkpoint sharded over a mesh spanning both processes (each process reads only the
shards of its own devices), runs a forward on a global batch, writes the gathered logits.
"""

import os
import sys

process_id, port, model_dir, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxrlhf.parallel import maybe_initialize_distributed  # noqa: E402

assert maybe_initialize_distributed("always", f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from hf_fixtures import padded_batch  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxrlhf.models import load_pretrained, save_pretrained  # noqa: E402
from jaxrlhf.parallel import TRAINING_RULES, batch_sharding, make_mesh  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = make_mesh(fsdp=4, tensor=2)
model = load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES)
ids, mask = padded_batch([12, 5, 9, 1, 12, 7, 3, 10], 12, left=True)
rows = batch_sharding(mesh)
global_ids = jax.make_array_from_callback(ids.shape, rows, lambda index: ids[index])
global_mask = jax.make_array_from_callback(mask.shape, rows, lambda index: mask[index])
graphdef, state = nnx.split(model)
logits = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, global_ids, global_mask)
gathered = multihost_utils.process_allgather(logits, tiled=True)
save_pretrained(model, out_path + ".export")  # every process writes the slices of its own devices
if process_id == 0:
    np.save(out_path, np.asarray(gathered))
print(f"process {process_id} done", flush=True)

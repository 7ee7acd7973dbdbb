"""One process of a two-process export (started by test_sharded_export.py): loads a checkpoint
sharded over both processes' devices, exports it in several files, records what the export
allocated on this process's host, and exports it again with a NaN (refused). Memory: the peak of
numpy's buffers (tracemalloc) and the peak resident set (VmHWM, reset just before) above the
resident set it started from. ru_maxrss cannot be reset and starts at the RSS of the pytest
process this one was forked from, so it would show nothing."""

import json
import os
import sys

process_id, port, model_dir, out_dir, max_shard_size = sys.argv[1:6]
process_id = int(process_id)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxrlhf.parallel import maybe_initialize_distributed  # noqa: E402

assert maybe_initialize_distributed("always", f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import time  # noqa: E402
import tracemalloc  # noqa: E402

from flax import nnx  # noqa: E402

from jaxrlhf.checkpoint import NonFiniteValues  # noqa: E402
from jaxrlhf.models import load_pretrained, save_pretrained  # noqa: E402
from jaxrlhf.parallel import TRAINING_RULES, make_mesh, to_host  # noqa: E402


def resident(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(work) -> dict:
    """Peak numpy bytes and peak resident-set growth while `work()` runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = resident("VmRSS")
    tracemalloc.start()
    began = time.perf_counter()
    work()
    seconds = time.perf_counter() - began
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"numpy_peak": numpy_peak, "rss_peak_growth": resident("VmHWM") - start, "seconds": round(seconds, 2)}


model = load_pretrained(model_dir, mesh=make_mesh(fsdp=4, tensor=2), rules=TRAINING_RULES)
memory = {"export": measure(lambda: save_pretrained(model, out_dir, max_shard_size=max_shard_size))}
# The control: what the export did before (every parameter gathered to every host and kept until
# written), to show that these measures see a whole model when one is allocated.
params = [variable.get_value() for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))]
memory["gather"] = measure(lambda: [to_host(value) for value in params])

# A NaN in one slice, which one process writes: both processes refuse, and nothing is left.
kernel = model.decoder.layers.attn.k_proj.kernel
kernel.set_value(kernel.get_value().at[1, 200, 1, 40].set(float("nan")))
try:
    save_pretrained(model, out_dir + "-nan", max_shard_size=max_shard_size)
    refused = None
except NonFiniteValues as error:
    refused = str(error)
with open(os.path.join(os.path.dirname(out_dir), f"result{process_id}.json"), "w") as f:
    json.dump({"memory": memory, "refused": refused}, f)
print(f"process {process_id} done", flush=True)

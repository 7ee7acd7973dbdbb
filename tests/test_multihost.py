"""Two processes on 127.0.0.1 under jax.distributed (gloo collectives) behave like one process."""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from hf_fixtures import padded_batch, save_tiny_model, torch_logits
from jaxrlhf.models import load_pretrained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharded_forward_and_export(tmp_path):
    model_dir = save_tiny_model("llama_gqa_llama3", str(tmp_path))
    out = str(tmp_path / "logits.npy")
    port = str(free_port())
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    env.pop("XLA_FLAGS", None)
    workers = [subprocess.Popen([sys.executable, os.path.join(here, "multihost_worker.py"), str(i), port, model_dir,
                                 out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

    ids, mask = padded_batch([12, 5, 9, 1, 12, 7, 3, 10], 12, left=True)
    expected = np.asarray(load_pretrained(model_dir)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5, rtol=1e-5)
    exported = torch_logits(out + ".export", ids, mask)
    np.testing.assert_allclose(exported[mask == 1], expected[mask == 1], atol=1e-4, rtol=1e-4)

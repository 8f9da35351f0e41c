"""Registration of the `m1` rollout through VeRL's own mechanisms, each in a fresh process: the `verl.plugins` entry
point, VERL_USE_EXTERNAL_MODULES, a loud failure; and that m1_plugins.verl imports nothing of VeRL by itself."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

REGISTRIES = """
import json, verl
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
registered = ("m1", "async") in _ROLLOUT_REGISTRY and "m1" in RolloutReplicaRegistry._registry
result = {"registered": registered}
if registered:
    from transformers import AutoConfig
    adapter, replica = get_rollout_class("m1", "async"), RolloutReplicaRegistry.get("m1")
    result.update(adapter=f"{adapter.__module__}.{adapter.__name__}", replica=f"{replica.__module__}.{replica.__name__}",
                  model_type=AutoConfig.for_model("m1_hybrid").model_type)
print(json.dumps(result))
"""


def run_python(code, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


REGISTERED = {"registered": True, "adapter": "m1_plugins.verl.rollout.M1ServerAdapter",
              "replica": "m1_plugins.verl.server.M1Replica", "model_type": "m1_hybrid"}


def test_import_verl_registers_m1_through_the_entry_point():
    result, _ = run_python(REGISTRIES)
    assert result == REGISTERED
    # with VeRL's plugin discovery off nothing registers it: the entry point did
    assert run_python(REGISTRIES, VERL_USE_EXTERNAL_PLUGINS="none")[0] == {"registered": False}


def test_verl_use_external_modules_registers_m1():
    result, _ = run_python(REGISTRIES, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="m1_plugins.verl.register")
    assert result == REGISTERED


def test_a_registration_failure_is_logged_at_error_with_its_cause():
    # a VeRL whose replica module cannot be imported: VeRL itself only logs the plugin's failure at DEBUG
    code = "import sys; sys.modules['verl.workers.rollout.replica'] = None\n" + REGISTRIES.replace(
        "from verl.workers.rollout.replica import RolloutReplicaRegistry\n", "").replace(
        ' and "m1" in RolloutReplicaRegistry._registry', "")
    result, stderr = run_python(code)
    assert result == {"registered": False}
    assert "m1_plugins could not register the 'm1' rollout with VeRL; `rollout.name=m1` will be unknown" in stderr
    assert "ModuleNotFoundError: import of verl.workers.rollout.replica halted" in stderr


def test_the_package_imports_no_verl():
    code = ("import json, sys; import m1_plugins.verl, m1_plugins.verl.data, m1_plugins.verl.reward, m1_plugins.cli\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'verl' or m.startswith(('verl.', 'ray')))))")
    assert run_python(code)[0] == []

"""TorchX components: entrypoints, replicas, arguments, environment, elastic node counts."""

import inspect
import json
import os
import subprocess
import sys

import pytest
from torchx import specs

from noisy_student_workloads import components

CONFIG = json.dumps({"output": "file:///r/x/", "note": "it's quoted"})


def test_components_module_imports_no_torch():
    code = "import sys, noisy_student_workloads.components; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_train_is_torchrun_with_elastic_nodes():
    app = components.train(CONFIG, "img:1", nnodes="1:4", nproc_per_node=2, cpu=8, gpu=1, memMB=8192,
                           env={"A": "1"}, name="run-g0-teacher")
    (role,) = app.roles
    assert app.name == "run-g0-teacher"
    assert role.entrypoint == "bash" and role.image == "img:1"
    assert (role.min_replicas, role.num_replicas) == (1, 4)
    cmd = role.args[1]
    assert cmd.startswith("torchrun ") and "--nnodes 1:4" in cmd and "--nproc_per_node 2" in cmd
    assert "-m noisy_student_workloads.train --config" in cmd
    assert role.env["A"] == "1"
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 1, 8192)


def test_train_config_survives_shell_quoting():
    app = components.train(CONFIG, "img")
    argv = subprocess.run(["bash", "-c", "printf '%s\\n' " + app.roles[0].args[1].split(" --config ", 1)[1]],
                          capture_output=True, text=True, check=True).stdout
    assert json.loads(argv.strip()) == json.loads(CONFIG)


@pytest.mark.parametrize("nnodes", ["0", "x", "3:2", "1:2:3"])
def test_train_rejects_bad_nnodes(nnodes):
    with pytest.raises(ValueError, match="nnodes"):
        components.train(CONFIG, "img", nnodes=nnodes)


def test_single_node_train_has_fixed_replicas():
    (role,) = components.train(CONFIG, "img", nnodes="2").roles
    assert (role.min_replicas, role.num_replicas) == (2, 2)


def test_label_has_one_role_with_replica_macros():
    app = components.label(CONFIG, "img", replicas=4, env={"B": "2"})
    (role,) = app.roles
    assert role.num_replicas == 4 and role.entrypoint == "python"
    assert role.args == ["-m", "noisy_student_workloads.label", "--config", CONFIG,
                         "--replica-id", specs.macros.replica_id, "--num-replicas", "4"]
    assert role.env == {"B": "2"}
    with pytest.raises(ValueError, match="replicas"):
        components.label(CONFIG, "img", replicas=0)


def test_balance_runs_the_balance_module():
    (role,) = components.balance(CONFIG, "img", name="b").roles
    assert role.args == ["-m", "noisy_student_workloads.balance", "--config", CONFIG]
    assert role.num_replicas == 1


def test_prepare_builds_the_data_pack_command():
    (role,) = components.prepare("img", "digits", "file:///d/", 10, seed=3, shard_size=400,
                                 validation_size=300).roles
    assert role.args == ["-m", "noisy_student_workloads.data", "pack", "--source", "digits", "--output", "file:///d/",
                         "--labels-per-class", "10", "--seed", "3", "--shard-size", "400",
                         "--validation-size", "300"]
    (role,) = components.prepare("img", "fashion-mnist", "s3://b/d/", 100, path="/data/fm").roles
    assert role.args[-2:] == ["--path", "/data/fm"]


def test_prepare_args_are_accepted_by_the_data_cli():
    from noisy_student_workloads import data

    (role,) = components.prepare("img", "digits", "file:///d/", 10, validation_size=300).roles
    with pytest.raises(SystemExit) as exit_info:
        data.main([*role.args[2:], "--help"])
    assert exit_info.value.code == 0


def test_local_env_puts_this_interpreter_first_on_path():
    env = components.local_env({"X": "1", "PATH": "/usr/bin"})
    assert env["X"] == "1"
    assert env["PATH"].split(os.pathsep)[:2] == [os.path.dirname(sys.executable), "/usr/bin"]
    assert components.local_env({"PATH": env["PATH"]})["PATH"] == env["PATH"]


def test_export_runs_the_export_module():
    (role,) = components.export(CONFIG, "img", name="e").roles
    assert role.args == ["-m", "noisy_student_workloads.export", "--config", CONFIG]


@pytest.mark.parametrize(
    "component", [components.train, components.label, components.balance, components.prepare, components.export]
)
def test_annotations_are_types_the_torchx_cli_can_decode(component):
    for parameter in inspect.signature(component).parameters.values():
        assert not isinstance(parameter.annotation, str), parameter.name

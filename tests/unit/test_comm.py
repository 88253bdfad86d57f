"""Every tensor handed to torch.distributed lives on its process group's device (NCCL: CUDA, gloo: CPU).

A lint over every `dist.<collective>(` call in spindle/ (its tensor is made by `comm_tensor` /
`comm_device`, or is one of the documented tensors below), and behaviour: the helper's answer per
backend, and the run-control collectives placing their tensors where it says.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spindle.parallel import comm

SPINDLE = Path(__file__).resolve().parents[2] / "spindle"
COLLECTIVES = {"all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv"}
# tensors that are not made for the collective: data already on the rank's compute device, which under NCCL
# is the current CUDA device (`init_distributed` sets it), so it is the group's device too
DOCUMENTED = {
    ("model/loss.py", "_sharded_token_losses", "row_max"): "from the vocabulary shard of a DTensor on its mesh",
    ("model/loss.py", "_sharded_token_losses", "sum_exp"): "from the vocabulary shard of a DTensor on its mesh",
    ("model/loss.py", "_sharded_token_losses", "picked"): "from the vocabulary shard of a DTensor on its mesh",
    ("parallel/context.py", "forward", "out"): "device=x.device: the activations being gathered",
    ("parallel/context.py", "backward", "out"): "device=g.device: the gradients being scattered",
    ("parallel/pipeline.py", "_run", "stats"): "the stage's loss statistics, on env.device with its outputs",
    ("train/optim.py", "clip_gradients", "sq"): "squared gradient norms, on the gradients' device",
    ("parallel/layout.py", "sum_over_data_ranks", "t"): "token counts of the step, on the layout's device",
    ("parallel/layout.py", "sum_over_gradient_ranks", "t"): "loss statistics of the step, on the layout's device",
    ("parallel/experts.py", "exchange", "out"): "x.new_empty: the hidden states (or their gradients) exchanged",
    ("parallel/experts.py", "__call__", "received"): "empty_like(plan.counts): routing counts, with the activations",
}


def collective_calls():
    """(file, enclosing function, tensor argument, its assignments' source) for each collective call."""
    for path in sorted(SPINDLE.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and isinstance(call.func.value, ast.Name) and call.func.value.id in ("dist", "comm")
                        and call.func.attr in COLLECTIVES):
                    continue
                arg = call.args[0]
                assert isinstance(arg, ast.Name), f"{path}:{call.lineno}: pass the collective a named tensor"
                made = [ast.get_source_segment(source, node.value) for node in ast.walk(fn)
                        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == arg.id
                                                                for t in node.targets)]
                yield str(path.relative_to(SPINDLE)), fn.name, arg.id, made, call.lineno


def test_every_collective_tensor_is_made_on_the_group_device():
    seen, wrong = set(), []
    for rel, fn, name, made, line in collective_calls():
        key = (rel, fn, name)
        seen.add(key)
        if any("comm_tensor(" in m or "comm_device(" in m for m in made):
            continue
        if key not in DOCUMENTED:
            wrong.append(f"spindle/{rel}:{line} {fn}(): dist collective on {name!r}, made by {made or 'a caller'}")
    assert not wrong, "tensors for collectives must come from spindle.parallel.comm:\n" + "\n".join(wrong)
    assert seen >= set(DOCUMENTED), f"documented but gone (drop them): {set(DOCUMENTED) - seen}"
    # the lint sees the run controls' collectives, which are made through the helper
    assert ("train/controls.py", "step_signals", "value") in seen
    assert ("checkpoint/manager.py", "_on_writer", "failed") in seen


def test_comm_device_follows_the_backend(tmp_path, monkeypatch):
    assert comm.comm_device() == torch.device("cpu")  # no process group: nothing is communicated
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert comm.comm_device() == torch.device("cpu")
        assert comm.comm_tensor((2,), torch.int64).device.type == "cpu"
        # under NCCL: the current CUDA device (not cuda:0, not the CPU), also for a mixed-backend group
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        for backend in ("nccl", "cpu:gloo,cuda:nccl"):
            monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
            assert comm.comm_device() == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()


class Placed(Exception):
    pass


def test_run_controls_hand_collectives_the_group_device(tmp_path, monkeypatch):
    """step_signals and the checkpoint manager's agreement put their tensors where comm_device says
    (meta here, standing in for a CUDA device: a CPU tensor would be the NCCL failure)."""
    from types import SimpleNamespace

    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig
    from spindle.train.controls import step_signals

    devices = []

    def spy(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise Placed

    monkeypatch.setattr(comm, "comm_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", spy)
    env = SimpleNamespace(is_main=False, distributed=True, device=torch.device("cpu"))
    with pytest.raises(Placed):
        step_signals(None, env, False)
    manager = CheckpointManager(str(tmp_path / "ck"), CkptConfig(), distributed=True)
    with pytest.raises(Placed):
        manager._on_writer(lambda: None)
    assert devices == [torch.device("meta")] * 2

"""Unscale and clip of gradients that mix DTensors and plain tensors (tensor parallelism without FSDP:
sharded projections next to plain norms), on a 1-rank gloo mesh in this process."""

import pytest
import torch
import torch.distributed as dist

from spindle.train.optim import clip_gradients, gradient_groups, unscale_gradients


@pytest.fixture
def tp_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def params_with_grads(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen), torch.randn(3, generator=gen)]
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen), torch.randn(3, generator=gen)]
    layouts = [[Shard(0)], [Replicate()], None]  # column-parallel weight, replicated bias, plain norm
    params = []
    for v, g, layout in zip(values, grads, layouts):
        p = torch.nn.Parameter(v if layout is None else distribute_tensor(v, mesh, layout))
        p.grad = g.clone() if layout is None else distribute_tensor(g.clone(), mesh, layout)
        params.append(p)
    return params, grads


def local(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_mixed_kinds_are_grouped_and_the_raw_foreach_refuses_them(tp_mesh):
    params, _ = params_with_grads(tp_mesh)
    assert [len(g) for g in gradient_groups(params)] == [1, 1, 1]  # Shard(0), Replicate, plain
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        torch._foreach_mul_([p.grad for p in params], 0.5)  # what the trainer did before


def test_unscale_multiplies_every_kind(tp_mesh):
    params, grads = params_with_grads(tp_mesh)
    unscale_gradients(params, 1 / 1024)
    for p, g in zip(params, grads):
        torch.testing.assert_close(local(p.grad), g / 1024, rtol=0, atol=0)


def test_clip_uses_the_global_norm_over_kinds(tp_mesh):
    params, grads = params_with_grads(tp_mesh)
    expected = torch.cat([g.flatten() for g in grads]).norm()
    norm = clip_gradients(params, max_norm=1.0, device=torch.device("cpu"))
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, g in zip(params, grads):
        torch.testing.assert_close(local(p.grad), g * (1.0 / (expected + 1e-6)), rtol=1e-6, atol=1e-7)

"""Foreign weights load into sharded models (torchrun, gloo): FSDP2 on one rank and tensor
parallelism on two give the unsharded model's logits, for a Hugging Face folder (Qwen3: q/k norm,
explicit head_dim) and an InternEvo checkpoint (tp2 x pp2 shards)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spindle.checkpoint.families import model_config_from_hf
from spindle.checkpoint.hf import load_hf_weights
from spindle.checkpoint.internevo import load_internevo_weights, read_internevo
from spindle.config import ModelConfig
from spindle.model.llama import build_model

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A Qwen3 HF folder and an InternEvo INTERNLM2_PUBLIC folder (tp2 x pp2), written once."""
    from unit.test_hf_families import hf_case
    from unit.test_internevo_ckpt import make_case

    tmp = tmp_path_factory.mktemp("src")
    hf_case("qwen3", head_dim=24).save_pretrained(str(tmp / "qwen3"))
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.parallel_context"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        import types

        for n in names:
            sys.modules[n] = types.ModuleType(n)
        config = type("Config", (dict,), {"__module__": names[-1]})
        sys.modules[names[-1]].Config = config
        internevo, _ = make_case(tmp, config, "internlm2_not_adapt_hf", 2, 2)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return {"hf": tmp / "qwen3", "internevo": internevo}


def unsharded(kind, folder):
    if kind == "hf":
        section = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    else:
        section = read_internevo(folder).model
    model = build_model(ModelConfig.model_validate(section).to_args(), seed=0)
    (load_hf_weights if kind == "hf" else load_internevo_weights)(model, folder)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("layout, nproc", [("fsdp", 1), ("tp", 2)])
def test_sharded_model_loads_foreign_weights(tmp_path, sources, layout, nproc):
    out = tmp_path / "logits.pt"
    specs = [f"{kind}:{folder}" for kind, folder in sources.items()]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "distributed" / "load_sharded.py"), layout, str(out), *specs]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    results = torch.load(out, weights_only=True)
    for kind, folder in sources.items():
        got = results[f"{kind}:{folder}"]
        assert "DTensor" in got["param_types"], got["param_types"]  # the model really was sharded
        diff = (got["logits"] - unsharded(kind, folder)).abs().max().item()
        print(f"PARITY sharded {layout} x{nproc} {kind}: {diff:.2e}")  # docs/interop.md (pytest -s)
        assert diff <= 1e-5, f"{layout} {kind}: {diff:.2e}"

"""Optional dependencies: the one way Spindle imports a package that not every install has.

`pip install spindle` brings what the core paths need (training on text or binary shards, local checkpoints,
the built-in tokenizers, generation, perplexity); the pip extras bring the rest, each for the paths that use it:

    [hf]     transformers, datasets, huggingface_hub, pyarrow, jinja2: chat templates, Hugging Face dataset
             folders (`data.type="streaming"`, `spindle prepare` on a Hub download, parquet files), the
             transformers baseline of `spindle bench train`
    [s3]     boto3, botocore: `boto3:s3://` checkpoint folders
    [eval]   lm-eval: `spindle eval tasks`, `lm_eval --model spindle`
    [track]  wandb, mlflow-skinny: `monitor.wandb`, `monitor.mlflow`

Every such import goes through `require`, so a missing package is one line naming the extra that brings it
(exit code 2) instead of a traceback; tests/unit/test_extras.py checks that no module imports an optional
package any other way and that each feature's line names its extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from spindle.errors import SpindleError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module` imported for `feature`; a SpindleError naming `pip install 'spindle[extra]'` when it, or a
    package it needs, is not installed (or is too old to have what Spindle imports from it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or module).split(".")[0]
        raise SpindleError(f"{feature} needs the Python package {missing!r}, which is not installed: "
                           f"pip install 'spindle[{extra}]'") from None
    except ImportError as exc:  # installed, but a name Spindle uses is not in this version
        raise SpindleError(f"{feature} could not import {module} ({exc}); upgrade it: "
                           f"pip install -U 'spindle[{extra}]'") from None

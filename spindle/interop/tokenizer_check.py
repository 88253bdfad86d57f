"""A run that starts from a checkpoint or a Hugging Face folder reads its data with the tokenizer that
checkpoint was trained with (issue 25): the check, beside the foreign formats it reads."""

from __future__ import annotations

from typing import Optional

from spindle.data.tokenizer import load_tokenizer
from spindle.data.tokenizer_identity import Recorded, describe, read_checkpoint_record, same_ids
from spindle.errors import SpindleError
from spindle.interop.hf import local_dir


def check_start(plan, run: Optional[Recorded]) -> None:
    """A run that starts from a checkpoint (resumes, or takes its weights) reads ids with the tokenizer that
    checkpoint was trained with: a Spindle checkpoint's record, or a Hugging Face folder's own tokenizer."""
    if run is None:
        return
    recorded = None
    if plan.kind == "spindle" and plan.ref is not None:
        rel = plan.ref.rel
        recorded = read_checkpoint_record(lambda name: plan.storage.read_bytes(f"{rel}/{name}"), str(plan.path))
    elif plan.kind == "hf" and plan.url:
        folder = local_dir(plan.url)
        if any((folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
            recorded = Recorded(load_tokenizer(folder).identity(), str(folder))
    if recorded is not None and not same_ids(recorded.identity, run.identity):
        raise SpindleError(f"{recorded.where}: the checkpoint was trained with {describe(recorded.identity)}, but "
                           f"this run's data is read with {describe(run.identity)} ({run.where}); use data "
                           f"prepared with the checkpoint's tokenizer")

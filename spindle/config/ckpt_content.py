"""What a checkpoint load restores (`load_ckpt_info`'s `content`), defined once.

A checkpoint holds four parts a load may take or leave:
  model      the weights;
  optimizer  the AdamW moments;
  scheduler  the schedule position (optimizer updates) and the fp16 loss scaler;
  sampler    the data position: step, consumed tokens, skipped steps, the loader's position, the RNG streams.
"all" is the four. Which key of the trainer state (and which tensors) belong to which part is said once, in
spindle.checkpoint.records; the config checks the names here.
"""

from __future__ import annotations

from typing import Iterable, Literal

MODEL, OPTIMIZER, SCHEDULER, SAMPLER = "model", "optimizer", "scheduler", "sampler"
CONTENT_PARTS = (MODEL, OPTIMIZER, SCHEDULER, SAMPLER)
ALL = "all"
# the parts read from trainer_state.json: a load that takes one needs the state file
STATE_PARTS = (SCHEDULER, SAMPLER)

# the config's type for one name of `content` (in the order its error message has always listed them)
ContentName = Literal[(MODEL, SAMPLER, OPTIMIZER, SCHEDULER, ALL)]


def expand_content(content: Iterable[str]) -> tuple[str, ...]:
    """The parts a content list names ("all": the four)."""
    content = tuple(content)
    return CONTENT_PARTS if ALL in content else content


def needs_state(content: Iterable[str]) -> bool:
    """Whether loading `content` reads the trainer state (counters, loader, scaler)."""
    return any(part in STATE_PARTS for part in content)

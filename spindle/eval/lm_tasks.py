"""The lm-evaluation-harness tasks a command or a training run asks for, found once (`task_manager`):
`spindle eval tasks` (spindle/cli/eval_tasks.py) and `long_eval.tasks` (spindle/train/lm_eval_hook.py)."""

from __future__ import annotations

from typing import Optional

from spindle.errors import SpindleError
from spindle.extras import require

EVAL_TASKS = "spindle eval tasks (lm-evaluation-harness)"


def task_manager(names: list[str], include_path: Optional[str], feature: str = EVAL_TASKS):
    """lm-eval's TaskManager that knows every name asked for: --include-path alone when it holds them all
    (indexing lm-eval's thousands of task files takes a while)."""
    TaskManager = require("lm_eval.tasks", "eval", feature).TaskManager
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([n]) for n in names):
            return manager
    manager = TaskManager(include_path=include_path)
    missing = [n for n in names if not manager.match_tasks([n])]
    if missing:
        where = f"{include_path} or " if include_path else ""
        raise SpindleError(f"--tasks {','.join(missing)}: no such task in {where}lm-eval's tasks "
                           "(lm-eval ls tasks lists them)")
    return manager

"""InternEvo's side of a config file: module-level constants and which names are keys."""

from __future__ import annotations

from spindle.config.schema import SpindleConfig

# Module-level constants the seed guide writes. They are plain variables used inside the file;
# other all-caps names are accepted too (users add their own), lower-case names must be known keys.
KNOWN_CONSTANTS = {
    "JOB_NAME", "DO_ALERT", "SEQ_LEN", "HIDDEN_SIZE", "NUM_ATTENTION_HEAD", "NUM_KV_ATTENTION_HEAD", "MLP_RATIO",
    "NUM_LAYER", "VOCAB_SIZE", "MODEL_ONLY_FOLDER", "SAVE_CKPT_FOLDER", "LOAD_CKPT_FOLDER", "CHECKPOINT_EVERY",
    "TRAIN_FOLDER", "VALID_FOLDER",
}


def _split_constants(raw: dict) -> tuple[dict, dict]:
    keys, constants = {}, {}
    for key, value in raw.items():
        if key in SpindleConfig.model_fields:
            keys[key] = value
        elif key.isupper() or key in KNOWN_CONSTANTS:
            constants[key] = value
        else:
            keys[key] = value  # validation reports it as unknown, with the closest valid key
    return keys, constants

"""`--set` never silently rewrites a key the file states (issue 25 point 3): a derived key (lr_scheduler.total_steps,
beta2_scheduler.init_beta2 / c, data.valid_micro_num) follows its source only where the file derives it from that
source (the seed's `total_steps=data["total_steps"]`, or both written as the same constant, the demo's TOTAL_STEPS);
a value the file writes itself is kept."""

from pathlib import Path

from spindle.config.load import load_config

REPO = Path(__file__).resolve().parents[2]


def test_a_stated_valid_micro_num_is_kept_when_micro_num_is_set(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("data = dict(seq_len=16, micro_num=2, valid_micro_num=2, total_steps=10)\n"
                   "lr_scheduler = dict(total_steps=10)\n")
    loaded = load_config(cfg, ["data.micro_num=1", "data.total_steps=4"])
    assert loaded.data.micro_num == 1 and loaded.data.valid_micro_num == 2
    assert loaded.data.total_steps == 4 and loaded.lr_scheduler.total_steps == 10  # written as a number: kept
    # not in the file: the default (micro_num) applies after --set
    cfg.write_text("data = dict(seq_len=16, micro_num=2)\n")
    assert load_config(cfg, ["data.micro_num=3"]).data.valid_micro_num == 3


def test_a_key_the_file_derives_follows_its_source(tmp_path):
    seed = load_config(REPO / "configs" / "7B_sft.py", ["data.total_steps=20", "adam.adam_beta2=0.9"])
    assert seed.lr_scheduler.total_steps == 20 and seed.beta2_scheduler.init_beta2 == 0.9
    assert seed.data.valid_micro_num == 4  # valid_micro_num=4 is written out: micro_num's --set would not move it
    demo = load_config(REPO / "configs" / "demo.py", ["data.total_steps=20"])
    assert demo.lr_scheduler.total_steps == 20  # both TOTAL_STEPS
    cfg = tmp_path / "c.py"
    cfg.write_text("data = dict(micro_num=2)\ndata['valid_micro_num'] = data.get('micro_num')\n")
    assert load_config(cfg, ["data.micro_num=5"]).data.valid_micro_num == 5
    assert load_config(cfg, ["data.micro_num=5", "data.valid_micro_num=1"]).data.valid_micro_num == 1

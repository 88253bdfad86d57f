"""Paths stay inside (issue 22, point 3): names read from a bucket listing, a config or the command line
never escape the folder they belong to, and files Spindle writes are never written through a planted
symbolic link; staging folders on the shared staging disk are private and only our own are uploaded.

Each test was first run against the unfixed code and failed there (the report of the commit says how).
"""

from __future__ import annotations

from spindle.config import validate_config
from spindle.config.load import save_resolved_config


# --------------------------------------------------------------------------- the run's config.json


def test_run_config_json_not_written_through_a_symlink(tmp_path):
    """A config.json planted as a link to a user's file: the file is untouched, the link replaced."""
    victim = tmp_path / "users_file.json"
    victim.write_text("precious")
    run = tmp_path / "runs" / "job"
    run.mkdir(parents=True)
    (run / "config.json").symlink_to(victim)
    out = save_resolved_config(validate_config({"JOB_NAME": "job"}), run)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and '"JOB_NAME": "job"' in out.read_text()

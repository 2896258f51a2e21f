"""What the driver prints for its workers' log lines (the lines reach it through the progress board)."""

from __future__ import annotations

import logging

from difftrain_dist.distrib.driver.progress import BoardLogHandler, note_text


def test_a_restarted_worker_group_is_named_with_its_attempt_and_checkpoint():
    fresh = {"message": "starting at step 0", "rank": 0, "resume": {"checkpoint": None, "step": 0}}
    resumed = {"message": "resumed from checkpoint_000000010 (step 10)", "rank": 0,
               "resume": {"checkpoint": "checkpoint_000000010", "step": 10}}
    assert note_text(fresh, starts=1) is None
    assert note_text(resumed, starts=1) == "resumed from checkpoint_000000010 (step 10)"
    assert note_text(resumed, starts=2) == ("worker group restarted after a failure (attempt 2): "
                                            "resumed from checkpoint_000000010 (step 10)")
    assert note_text(fresh, starts=3) == ("worker group restarted after a failure (attempt 3): "
                                          "started again from step 0 (no checkpoint saved yet)")
    assert note_text({"message": "skipping x: y", "rank": 0}, starts=2) == "skipping x: y"
    assert note_text({"message": "odd", "rank": 1}, starts=1) == "rank 1: odd"


def test_the_log_handler_sends_warnings_and_resume_records_only():
    class Board:  # stands in for the actor handle: `.note.remote(line)` records the line
        def __init__(self):
            self.lines = []
            self.note = self

        def remote(self, line):
            self.lines.append(line)

    board = Board()
    handler = BoardLogHandler(board.note.remote, rank=0)
    logger = logging.getLogger("difftrain_dist.test_progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("chatter")
        logger.info("starting", extra={"resume": {"checkpoint": None, "step": 0}})
        logger.warning("skipping %s: %s", "checkpoint_000000003", "missing rank_1.json")
    finally:
        logger.removeHandler(handler)
    assert board.lines == [
        {"message": "starting", "rank": 0, "resume": {"checkpoint": None, "step": 0}},
        {"message": "skipping checkpoint_000000003: missing rank_1.json", "rank": 0},
    ]

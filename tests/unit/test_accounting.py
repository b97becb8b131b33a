"""`sluice status`'s in = out lines, from counter snapshots."""

from pipeline.accounting import lines


def test_a_clean_run_adds_up_and_loses_nothing():
    text = "\n".join(lines({
        "capture": {"records_read": 10, "records_journaled": 10, "enrich_sent": 12,
                    "records_resent": 2, "kernel_denied": 10, "journal_unstored": 0},
        "persist": {"rows_inserted": 10, "duplicates_skipped": 2}}))
    assert "read 10 = journaled 10 + unjournaled 0;" in text
    assert "map read" not in text
    assert "sent to enrich 12, of them 2 resent" in text
    assert "stored 10 row(s), 2 already stored" in text
    assert text.endswith("lost:    nothing")


def test_losses_and_a_mismatch_are_named():
    text = "\n".join(lines({
        "capture": {"records_read": 10, "records_journaled": 5, "journal_full": 3,
                    "records_lost": 2, "kernel_ringbuf_full": 4, "kernel_parked": 3,
                    "kernel_lost": 1, "journal_unstored": 7, "map_read_errors": 2}}))
    assert "read 10 = journaled 5 + unjournaled 3 (MISMATCH)" in text
    assert "refused 4 record(s): 3 packet(s) parked" in text and "1 lost" in text
    assert "7 record(s) not stored yet" in text
    assert "1 lost; 2 failed map read(s)" in text
    evicted = "\n".join(lines({"capture": {"kernel_lost": 1, "kernel_evicted": 4}}))
    assert "1 lost; 4 packet(s) evicted with their flow before being reported" in evicted
    assert "lost:    records_lost 2" in text


def test_no_counters_yet_is_all_zero():
    assert lines({})[-1] == "lost:    nothing"

"""The shared-memory mailboxes of same-node exchanges (no Ray; the reader runs in a subprocess
where it matters that it is another process)."""

import glob
import multiprocessing as mp

import numpy as np

from actors.shm_channel import Inbox, Outbox, remove_run_segments, segment_prefix

RUN = "edgeray-run-test-0123456789ab"


def _read_in_child(messages, results):
    inbox = Inbox()
    results.put([inbox.read(m)["x"].sum() for m in messages])
    inbox.close()


def test_messages_round_trip_grow_and_never_alias():
    outbox, inbox = Outbox(f"{segment_prefix(RUN)}-c1"), Inbox()
    small = {"x": np.arange(10, dtype=np.float32), "tag": "a"}
    got = inbox.read(outbox.write(small))
    assert got["tag"] == "a" and np.array_equal(got["x"], small["x"])
    big = {"x": np.ones(3_000_000, dtype=np.float32)}           # larger than the first segment: it grows
    kept = inbox.read(outbox.write(big))["x"]
    inbox.read(outbox.write({"x": np.zeros(3_000_000, dtype=np.float32)}))
    assert kept.sum() == 3_000_000                               # a message read earlier is a copy, not a view
    outbox.close()
    again = Outbox(f"{segment_prefix(RUN)}-c1")                  # same owner, a new segment: re-mapped, not stale
    assert inbox.read(again.write({"x": np.full(4, 7.0)}))["x"].tolist() == [7.0] * 4
    again.close()
    inbox.close()


def test_another_process_reads_and_the_run_leaves_no_segment():
    outbox = Outbox(f"{segment_prefix(RUN)}-c2")
    messages = [outbox.write({"x": np.full(100_000, 2.0)})]
    results = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_read_in_child, args=(messages, results))
    child.start()
    assert results.get(timeout=60) == [200_000.0]
    child.join(60)
    assert glob.glob(f"/dev/shm/{segment_prefix(RUN)}-*")       # the reader's exit did not unlink it
    assert remove_run_segments(RUN) >= 1                         # what a killed writer leaves, the driver removes
    assert not glob.glob(f"/dev/shm/{segment_prefix(RUN)}-*")
    outbox.close()                                               # already gone: no error


def test_a_message_is_metered_like_the_object_it_carries():
    from actors.metering import payload_bytes

    outbox = Outbox(f"{segment_prefix(RUN)}-c3")
    obj = {"grad": np.ones((4, 32, 12, 12), dtype=np.float32), "step": 3}
    assert outbox.write(obj).nbytes == payload_bytes(obj)
    outbox.close()

"""HeadWatch (rtrain.distributed.ray_cluster): a GCS port that stops answering is a lost head after the timeout,
one that answers again within it is not; outside Ray and with timeout 0 nothing is watched."""

from __future__ import annotations

import socket
import threading
import time

from rtrain.distributed.ray_cluster import HeadWatch


def _listener(port: int = 0) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)  # never accepted: every probe of a test fits in the queue
    return server


def test_a_head_that_stops_answering_is_lost_once_after_the_timeout():
    server = _listener()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    reasons, called = [], threading.Event()
    watch = HeadWatch(0.6, on_lost=lambda why: (reasons.append(why), called.set()), address=address, poll_s=0.05)
    with watch:
        time.sleep(0.5)
        assert watch.lost is None and watch.answers()
        server.close()
        gone = time.monotonic()
        assert called.wait(10)
        waited = time.monotonic() - gone
    assert waited >= 0.6 - 0.05 - 0.01  # counted from the last probe answered, at most a poll before the close
    assert reasons == [watch.lost]
    assert reasons[0].startswith(f"lost the Ray head: its GCS at {address} did not answer for 0.6 s")


def test_a_head_back_within_the_timeout_is_not_lost():
    server = _listener()
    port = server.getsockname()[1]
    watch = HeadWatch(1.5, on_lost=lambda why: None, address=f"127.0.0.1:{port}", poll_s=0.05)
    with watch:
        server.close()
        time.sleep(0.5)  # a GCS restarting (Ray's GCS fault tolerance)
        server = _listener(port)
        time.sleep(1.5)
        assert watch.lost is None
    server.close()


def test_nothing_is_watched_outside_ray_or_when_off():
    assert HeadWatch(5.0).start()._thread is None  # this process is not connected to Ray
    assert HeadWatch(0.0, address="127.0.0.1:1").start()._thread is None
    assert not HeadWatch(5.0, address="127.0.0.1:notaport").answers()


def test_a_launch_from_another_thread_installs_no_signal_handler():
    from rtrain.launch.ray import _interrupted_when_lost

    done = []

    def launch() -> None:
        with _interrupted_when_lost(HeadWatch(5.0, address="127.0.0.1:1")):
            done.append(True)

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join(10)
    assert done == [True]


def test_only_a_definite_no_answer_counts_and_only_after_a_first_answer(monkeypatch):
    import errno

    import rtrain.distributed.ray_cluster as ray_cluster

    closed = _listener()
    never = HeadWatch(0.3, on_lost=lambda why: None, address=f"127.0.0.1:{closed.getsockname()[1]}", poll_s=0.05)
    closed.close()  # refused from the start (an address this process cannot reach, e.g. behind ray://)
    with never:
        time.sleep(1.0)
        assert never.lost is None and never.answers() is False

    server = _listener()
    watch = HeadWatch(0.3, on_lost=lambda why: None, address=f"127.0.0.1:{server.getsockname()[1]}", poll_s=0.05)
    with watch:
        time.sleep(0.3)  # answered: armed

        def out_of_descriptors(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(ray_cluster.socket, "create_connection", out_of_descriptors)
        time.sleep(1.0)  # this process cannot tell: not evidence that the head is gone
        assert watch.answers() is None and watch.lost is None
    server.close()


def test_the_lost_head_signal_still_reaches_the_handler_installed_before():
    import os
    import signal

    from rtrain.launch.ray import HEAD_LOST_SIGNAL, _interrupted_when_lost

    heard = []
    previous = signal.signal(HEAD_LOST_SIGNAL, lambda signum, frame: heard.append(signum))
    server = _listener()
    try:
        with _interrupted_when_lost(HeadWatch(5.0, address=f"127.0.0.1:{server.getsockname()[1]}")):
            os.kill(os.getpid(), HEAD_LOST_SIGNAL)  # not a lost head: somebody else's signal
            time.sleep(0.1)
        assert heard == [HEAD_LOST_SIGNAL]
    finally:
        signal.signal(HEAD_LOST_SIGNAL, previous)
        server.close()

"""rtrain._ports: a port picked for a server that starts later is never one the kernel hands out by itself."""

from __future__ import annotations

import socket

from rtrain._ports import LOOPBACK, ephemeral_range, unused_port


def test_ports_are_drawn_outside_the_kernels_automatic_range_and_are_free() -> None:
    span = ephemeral_range()
    picked = {unused_port(LOOPBACK) for _ in range(50)}
    assert len(picked) == 50  # drawn at random, and never handed out twice (claimed for RESERVE_S)
    for port in picked:
        if span is not None and span[0] > 30016:
            assert 30000 <= port < span[0], (port, span)
        with socket.socket() as s:
            s.bind((LOOPBACK, port))


def test_a_port_in_use_is_never_picked() -> None:
    held = []
    try:
        for _ in range(200):  # hold many: a draw that lands on one of them must draw again
            s = socket.socket()
            s.bind((LOOPBACK, unused_port(LOOPBACK)))
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert all(unused_port(LOOPBACK) not in taken for _ in range(200))
    finally:
        for s in held:
            s.close()

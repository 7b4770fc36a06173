"""Ids drawn from a block of OS randomness: distinct, version 4, and never repeated by a forked child."""

from __future__ import annotations

import os
import uuid

from textgen import ids


def test_uuids_are_version_4_and_distinct_across_blocks() -> None:
    made = [ids.random_uuid() for _ in range(2000)]  # several blocks of the pool
    assert len(set(made)) == len(made)
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in made)
    assert len(ids.random_hex(8)) == 16


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    ids.random_uuid()  # the parent holds a partly used block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, ids.random_uuid().bytes)
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert uuid.UUID(bytes=child) != ids.random_uuid()

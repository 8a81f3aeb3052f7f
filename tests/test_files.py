"""reflow_exp.files: atomic writes, JSON-safe values, digests, cached folders built once."""

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from reflow_exp import files


def test_write_atomic_replaces_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "status.json"
    files.write_json_atomic(path, {"a": 1})
    assert files.read_json(path) == {"a": 1}
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert files.read_json(path) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    path.write_text("[1, 2")  # a reader racing a foreign writer: {} rather than an exception
    assert files.read_json(path) == {} and files.read_json(tmp_path / "missing.json") == {}


def test_json_safe_turns_numpy_torch_and_paths_into_json_types():
    value = {
        1: (np.float32(0.5), torch.tensor(3), np.bool_(True)),
        "p": Path("/x"),
        "n": None,
        "f": [torch.tensor(2.5)],
    }
    assert files.json_safe(value) == {"1": [0.5, 3, True], "p": "/x", "n": None, "f": [2.5]}
    assert type(files.json_safe(np.int64(7))) is int and files.json_safe(np.bool_(False)) is False


def test_deep_merge_merges_nested_dicts():
    base = {"params": {"total": 3}, "x": 1}
    assert files.deep_merge(base, {"params": {"trainable": 1}, "x": 2}) == {
        "params": {"total": 3, "trainable": 1},
        "x": 2,
    }


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "w.bin").write_bytes(data)
    assert files.file_digest(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def test_free_port_can_be_bound():
    import socket

    port = files.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from reflow_exp.files import build_once

    dest, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(work):
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        work.mkdir()
        (work / "data.txt").write_text("ok")
        return {"n": 1}

    print(build_once(dest, {"v": 1}, build))
""")


def test_build_once_builds_once_when_two_processes_ask_at_the_same_time(tmp_path):
    dest, log = tmp_path / "cache", tmp_path / "log.txt"
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(dest), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outputs == ["{'n': 1}", "{'n': 1}"]
    assert log.read_text() == "built\n" and (dest / "data.txt").read_text() == "ok"

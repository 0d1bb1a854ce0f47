"""bench.gpu's profiling of a variant (--profile), checked where there is no GPU."""

import pytest

from bench import gpu


def test_py_spy_samples_the_process_without_pausing_it():
    argv = gpu.py_spy(1234, 2.6, "out/x.txt")
    assert argv[:4] == ["py-spy", "record", "-p", "1234"]
    assert argv[argv.index("-d") + 1] == "3" and "--nonblocking" in argv and argv[-2:] == ["-o", "out/x.txt"]


def test_a_variant_label_becomes_a_file_name():
    assert gpu.slug("shared session, CUDA blocking sync") == "shared-session-cuda-blocking-sync"
    assert gpu.slug("../a b/") == "a-b"


def test_profile_without_py_spy_says_so(monkeypatch, capsys):
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        gpu.main(["--profile", "--variant", "x:WARN_SHARED_SESSION=true"])
    assert "--profile needs py-spy" in capsys.readouterr().err

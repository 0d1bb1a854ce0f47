"""bench.compare's settings for the service under test (`--after-env`): one revision, two settings."""

import argparse

import pytest

from bench import compare


def test_a_setting_is_a_name_and_a_value():
    assert compare.setting("WARN_SHARED_SESSION=true") == ("WARN_SHARED_SESSION", "true")
    assert compare.setting('WARN_CORS_ORIGINS=["a=b"]') == ("WARN_CORS_ORIGINS", '["a=b"]')


@pytest.mark.parametrize("text", ["WARN_SHARED_SESSION", "=true", ""])
def test_a_setting_without_a_name_or_a_value_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        compare.setting(text)


def test_the_setting_reaches_only_the_service_it_is_given_to(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(compare, "Uvicorn", lambda app, env, launcher, cwd: started.append(env))
    compare.serve(tmp_path)
    compare.serve(tmp_path, **dict([compare.setting("WARN_SHARED_SESSION=true")]))
    assert "WARN_SHARED_SESSION" not in started[0] and started[1]["WARN_SHARED_SESSION"] == "true"

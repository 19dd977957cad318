"""CRIU's TLS options reach it through CRIU_CONFIG_FILE, whatever wraps runc."""

from __future__ import annotations

from agent.migration.postcopy import with_env

RUN_OUTSIDE = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect"]


def test_systemd_run_is_told_to_set_it_in_the_transient_service() -> None:
    argv = with_env([*RUN_OUTSIDE, "runc", "--root", "/r"], "CRIU_CONFIG_FILE", "/d/dump.conf")
    assert argv[:2] == ["systemd-run", "--setenv=CRIU_CONFIG_FILE=/d/dump.conf"]
    assert argv[2:] == [*RUN_OUTSIDE[1:], "runc", "--root", "/r"]


def test_a_systemd_run_behind_another_wrapper_and_by_path_is_found() -> None:
    argv = with_env(["nsenter", "-t", "1", "/usr/bin/systemd-run", "--wait", "runc"], "A", "b")
    assert argv == ["nsenter", "-t", "1", "/usr/bin/systemd-run", "--setenv=A=b", "--wait", "runc"]


def test_wrappers_that_pass_the_environment_on_are_left_as_they_are() -> None:
    command = ["nsenter", "-t", "1", "-m", "-p", "runc"]
    assert with_env(command, "A", "b") == command
    assert with_env([], "A", "b") == []

"""``lbsync lab`` argument handling that needs no kernel: one line, exit 2."""

from __future__ import annotations

import pytest

from lbsync.cli import main
from lbsync.lab import farm


@pytest.mark.parametrize("argv,words", [
    (["lab"], ["ACTION"]),
    (["lab", "up", "--nodes", "0"], ["--nodes", ">= 1"]),
    (["lab", "up", "--buckets", "many"], ["--buckets", "integer"]),
    (["lab", "up", "--name", "A"], ["--name", "'A'"]),
    (["lab", "up", "--mode", "backup"], ["--mode", "backup"]),
    (["lab", "down", "--name", "x" * 13], ["--name"]),
    (["lab", "traffic", "--udp", "1.5"], ["--udp", "integer"]),
    (["lab", "traffic", "--duration", "-1", "--tcp", "1"], ["--duration", "> 0"]),
    (["lab", "traffic", "--max-rate", "nan", "--tcp", "1"], ["--max-rate"]),
    (["lab", "traffic", "--family", "5"], ["--family"]),
    (["lab", "traffic"], ["nothing to do"]),
    (["lab", "exec", "1"], ["no command"]),
    (["lab", "exec", "1", "--"], ["no command"]),
    (["lab", "up", "--mode", "vrrp", "--ipv6"], ["vrrp"]),
    (["lab", "up", "--mode", "vrrp", "--advert-int", "0"], ["--advert-int"]),
    (["lab", "up", "--keepalived"], ["--keepalived", "--daemons"]),
    (["lab", "up", "--mode", "vrrp", "--keepalived"], ["vrrp", "--keepalived"]),
])
def test_user_errors_are_one_line_exit_2(argv: list[str], words: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]


def test_missing_lab_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert not farm.exists("lbtnone")
    assert main(["lab", "exec", "--name", "lbtnone", "1", "--", "true"]) == 2
    assert "lbtnone" in capsys.readouterr().err
    assert main(["lab", "status", "--name", "lbtnone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no lab named 'lbtnone'" in err[0]

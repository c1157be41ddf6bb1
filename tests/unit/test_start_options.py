"""`start` reads just enough of its stdin options to decide on the zygote."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2

from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.shim.start import _pb_fields, zygote_enabled


def options(config_path: str) -> bytes:
    ro = ro_pb2.Options(type_url="x", config_path=config_path)
    return any_pb2.Any(
        type_url="runtimeoptions.v1.Options", value=ro.SerializeToString()
    ).SerializeToString()


def test_hand_decoder_matches_protobuf() -> None:
    raw = options("/etc/podshim/config.toml")
    outer = _pb_fields(raw)
    assert outer[1] == b"runtimeoptions.v1.Options"
    assert _pb_fields(outer[2])[2] == b"/etc/podshim/config.toml"
    assert _pb_fields(b"\xff") == {}  # garbage is not an error


def test_zygote_from_config_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PODSHIM_ZYGOTE", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text("zygote = true\n")
    assert zygote_enabled(options(str(cfg)))
    cfg.write_text("zygote = false\n")
    assert not zygote_enabled(options(str(cfg)))
    # on by default: no config, a missing one, one that does not name it
    assert zygote_enabled(b"")
    assert zygote_enabled(options(str(tmp_path / "missing.toml")))
    cfg.write_text('log_level = "debug"\n')
    assert zygote_enabled(options(str(cfg)))
    monkeypatch.setenv("PODSHIM_ZYGOTE", "0")
    assert not zygote_enabled(b"")
    monkeypatch.setenv("PODSHIM_ZYGOTE", "1")
    cfg.write_text("zygote = false\n")
    assert zygote_enabled(options(str(cfg)))
    monkeypatch.setenv("PODSHIM_ZYGOTE", "0")
    cfg.write_text("zygote = true\n")
    assert not zygote_enabled(options(str(cfg)))


@pytest.mark.parametrize(
    ("pid", "status", "ns"),
    [(0, 0, 0), (4242, 137, 1_700_000_000_123_456_789), (1, 0, 5), (0, 255, 10**9)],
)
def test_delete_response_encoding_matches_protobuf(pid: int, status: int, ns: int) -> None:
    from podshim.api.task.v2 import shim_pb2
    from podshim.shim.delete import encode_delete_response

    ref = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    ref.exited_at.FromNanoseconds(ns)
    assert encode_delete_response(pid, status, ns) == ref.SerializeToString()
